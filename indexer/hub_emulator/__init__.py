"""A local Hugging Face Hub: serves `DIR/<org>/<name>/...` (and generated Llama-2-sized models) over real
HTTP with the endpoints, headers and error codes `huggingface_hub` expects, plus fault injection and a
request log for tests. LFS files are a 302 to signed, expiring URLs on a second loopback origin, the CDN,
as on huggingface.co. See `emulator.py` for the Python API, `server.py` for the protocol, `cdn.py` for the CDN.
"""

from indexer.hub_emulator.emulator import HubEmulator, configure, emulator_process, parse_virtual_spec, serve_forever
from indexer.hub_emulator.faults import Fault, Faults, parse_fault_spec
from indexer.hub_emulator.server import RequestRecord
from indexer.hub_emulator.virtual import LAYOUTS, bf16_to_f32

__all__ = [
    "emulator_process",
    "LAYOUTS",
    "Fault",
    "Faults",
    "HubEmulator",
    "RequestRecord",
    "bf16_to_f32",
    "configure",
    "parse_fault_spec",
    "parse_virtual_spec",
    "serve_forever",
]
