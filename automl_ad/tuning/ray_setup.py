"""Set-up run in every Ray worker process of a search (``worker_process_setup_hook``).

Ray Train V2 removes a trial's placement group after Tune kills the trial from a
detached ``PlacementGroupCleaner`` actor, which asks Ray's state API whether the trial's
controller is still alive. With no address given, that API looks for *the* Ray
instance on the machine and fails ("Found multiple active Ray instances") when there
are two, e.g. a search next to a notebook's Ray, or a test session's Ray next to a
search in a subprocess. The placement group then stayed reserved and later trials
waited for CPUs forever. Pinning ``RAY_ADDRESS`` to the worker's own cluster makes the
lookup unambiguous.
"""

from __future__ import annotations

import os

HOOK = "automl_ad.tuning.ray_setup.pin_ray_address"


def pin_ray_address() -> None:
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
