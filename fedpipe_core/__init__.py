"""FedPipe core: federated LoRA fine-tuning algorithms, free of any Flower import."""

import logging
import warnings

# Import-time chatter of optional backends (bitsandbytes' CPU kernel hub, torch.jit deprecations)
# would otherwise drown the one-line-per-round progress of a run.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
