"""The DeepSpeed config for a job spec. Derived, never asked for: batch sizes and accumulation come
from the spec's global/micro batch and the world size."""

from __future__ import annotations

__all__ = ["deepspeed_config", "resolve_precision"]


def resolve_precision(spec, cuda_available: bool, bf16_supported: bool) -> str:
    p = spec.deepspeed.precision
    if p != "auto":
        return p
    if not (spec.scaling.use_gpu and cuda_available):
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def deepspeed_config(spec, world_size: int, precision: str = "fp32") -> dict:
    ds = spec.deepspeed
    on_gpu = spec.scaling.use_gpu
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1 and ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.zero_stage == 3:
        # Full weights are gathered only when an output is written, not kept around.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    cfg = {
        "train_batch_size": spec.train.global_batch_size,
        "train_micro_batch_size_per_gpu": spec.train.micro_batch_size,
        "gradient_accumulation_steps": spec.train.global_batch_size // (spec.train.micro_batch_size * world_size),
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": spec.train.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": spec.train.weight_decay},
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # progress is ours (rank 0, one line per step)
        "wall_clock_breakdown": False,
    }
    if not ds.offload_optimizer and not (on_gpu and ds.fused_adam):
        # torch.optim.AdamW instead of DeepSpeed's FusedAdam, a CUDA op JIT-built with nvcc (`deepspeed.fused_adam`):
        # on CPU there is no such kernel; torch's own fused kernel needs no toolkit and no build, on GPU and on CPU.
        # On CPU it is one pass over memory instead of one per operation: 67M fp32 parameters (a ZeRO-2 rank's
        # half of SmolLM2-135M), 1 thread, 0.033 s a step against 0.33 s, results within 2.4e-7 (measured here).
        # transformers' Trainer picks the same kernel by default (`adamw_torch_fused`, torch >= 2.8).
        cfg["optimizer"]["params"]["torch_adam"] = True
        cfg["optimizer"]["params"]["fused"] = True
    if not on_gpu and ds.zero_stage in (1, 2):
        # gloo: average gradients with one all-reduce, not one `reduce` to each partition's owner (DeepSpeed's
        # `reduce_scatter`, default true; ZeRO-1 and 2 both reduce through that path at the accumulation boundary).
        # gloo's all-reduce of 134.5M fp32 between 2 ranks took 0.28-0.33 s here, a reduce-scatter of the same
        # 0.6-0.65 s; through DeepSpeed itself, a ZeRO-2 backward of SmolLM2 on 2 ranks with 8 tokens of work,
        # median 1.0 s against 1.4-1.8 s (at 2 x 2,048 tokens a step the saving is within the noise of ~25 s steps:
        # benchmarks/results/train_throughput_smollm2_full.md). The parameters after 4 steps are identical to the
        # last bit; each rank still keeps only its partition.
        zero["reduce_scatter"] = False
    if ds.offload_optimizer and not on_gpu:
        cfg["zero_force_ds_cpu_optimizer"] = True
    if spec.train.max_grad_norm is not None:
        cfg["gradient_clipping"] = spec.train.max_grad_norm
    return cfg
