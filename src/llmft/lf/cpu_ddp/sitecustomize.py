"""Imported by every Python process of a multi-process CPU training run (the train stage puts this folder first
on PYTHONPATH for those runs only): lets torch.load map a checkpoint to the device "cpu:<n>".

Why: with DDP on a CPU, accelerate names each process's device torch.device("cpu", 0), and transformers' resume
(Trainer._load_optimizer_and_scheduler) loads optimizer.pt with map_location=that device whenever world_size > 1.
torch only knows the location "cpu", so the resume of a killed run failed with "don't know how to restore data
location of torch.storage.UntypedStorage (tagged with cpu:0)" (transformers 5.6, accelerate 1.11, torch 2.11).
GPU runs map to "cuda:<n>", which torch knows, and never load this.
"""

import torch.serialization


def _cpu_index_deserialize(obj, location: str):
    if location.startswith("cpu:"):  # a CPU has one memory: "cpu:0" is "cpu"
        return obj
    return None


torch.serialization.register_package(11, lambda obj: None, _cpu_index_deserialize)
