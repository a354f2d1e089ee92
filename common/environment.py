"""Environment variables, named once: those fedpeft reads, and those every process it starts gets.

deploy/Dockerfile and docker-compose.yml set a subset of :data:`QUIET` for the containers;
tests/test_rehearsal.py checks that they agree with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

#: Server side: the coordinator's identity key file and the registered sites file.
COORDINATOR_KEY_ENV: Final = "FEDPEFT_COORDINATOR_KEY"
SITES_ENV: Final = "FEDPEFT_SITES"
#: Server side, deployment: the run store's SQLAlchemy URL (coordinator.toml ``store``). It may
#: carry a password: it reaches the ServerApp this way only, never in a run config or app bundle.
STORE_ENV: Final = "FEDPEFT_STORE"
#: Site side, simulation only: the folder with every virtual site's key (partition-N.key) and
#: the coordinator's public key (coordinator.pub).
SIMULATION_KEYS_ENV: Final = "FEDPEFT_SIMULATION_KEYS"
#: Site side, simulation only: the virtual sites' own settings (data set, columns, bad-row rule,
#: device) as JSON, from the simulation's config: the same party runs coordinator and sites.
SIMULATION_SITES_ENV: Final = "FEDPEFT_SIMULATION_SITES"
#: The key of the store's encrypted checkpoints: a file, or base64 of 32 bytes.
STORE_KEY_FILE_ENV: Final = "FEDPEFT_STORE_KEY_FILE"
STORE_KEY_ENV: Final = "FEDPEFT_STORE_KEY"
# Flower's home folder of a SuperLink, SuperNode or the ``flwr`` CLI.
FLWR_HOME_ENV: Final = "FLWR_HOME"

#: Every process fedpeft starts runs with these: no telemetry, no hub downloads.
QUIET: Final[Mapping[str, str]] = MappingProxyType(
    {
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }
)
