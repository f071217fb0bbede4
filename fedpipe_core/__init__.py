"""FedPipe core: federated LoRA fine-tuning algorithms, free of any Flower import."""

import logging
import os
import warnings

# Import-time chatter of optional backends (bitsandbytes' CPU kernel hub, torch.jit deprecations)
# would otherwise drown the one-line-per-round progress of a run.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")


def quiet() -> None:
    """Silence library chatter (progress bars, advisory warnings) so round lines stay readable."""
    from transformers.utils import logging as hf_logging  # imported only by what loads a model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("datasets").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)
