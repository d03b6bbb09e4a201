"""How a process reaches the tests' GCS and Azure emulators: the environment variables each
cloud's own tools read (fixtures: tests/conftest.py)."""

from __future__ import annotations

# Azurite's well-known development account (its documentation publishes this key; it opens
# nothing but a local emulator).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def gcs_env(endpoint: str) -> dict[str, str]:
    """gcsfs reads STORAGE_EMULATOR_HOST (and then asks for no credentials); its plain file
    system, not the "extended" one that asks Google's storage-control API (gRPC, off loopback)
    for each bucket's layout."""
    return {"STORAGE_EMULATOR_HOST": endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def azure_env(endpoint: str) -> dict[str, str]:
    """adlfs reads AZURE_STORAGE_CONNECTION_STRING, as Azure's own SDKs and CLI do."""
    return {"AZURE_STORAGE_CONNECTION_STRING": (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};")}
