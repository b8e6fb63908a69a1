"""From stored trials to a deployable model: choice, ensemble, export, predict, report."""
