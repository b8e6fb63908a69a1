"""automl_ad: AutoML for industrial visual anomaly detection."""

__version__ = "0.1.0"
