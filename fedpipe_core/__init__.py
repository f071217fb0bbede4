"""FedPipe core: federated LoRA fine-tuning algorithms, free of any Flower import."""
