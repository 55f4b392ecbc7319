"""Model Graph Index: source -> sketches -> store -> lineage -> query."""

import logging

# transformers and peft import torchao whenever it is installed (the `quant` extra writes the zoo's torchao
# copies). On a machine without its GPU it warns of every CUDA kernel it cannot load, and its enum
# registrations trip a torch deprecation warning: lines in every process that trains or reads with them,
# none about our work. Errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
