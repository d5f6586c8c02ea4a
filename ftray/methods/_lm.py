"""What the language-modelling methods share: the model class, batches, the loss (sft, causal_lm), and the
frozen reference policy the feedback methods compare against (dpo, grpo, ppo)."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect

import torch

from ftray.config import PEFT_KINDS
from ftray.data.encode import IGNORE
from ftray.methods.losses import head_positions, kept_sequence_logps, sequence_logps


def load_causal_lm(path, dtype, spec):
    from ftray.models.load import load_model

    extra = {}
    if spec.adapter.kind == "qlora":  # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, GPU only), LoRA on top
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
        )
        extra["device_map"] = {"": torch.cuda.current_device()}
    return load_model(path, dtype, spec.model.trust_remote_code, spec.model.attn_implementation, **extra)


def collate_tokens(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows (with position_ids, padded to `data.max_length` as their own segment) carry no attention
    mask and are cut to the longest row's real tokens (`tokens`): what follows is padding in every row.
    Unpacked rows are right-padded to the longest and masked."""
    if examples and examples[0].get("position_ids") is not None:
        n = max(e.get("tokens") or len(e["input_ids"]) for e in examples)
        return {k: torch.tensor([e[k][:n] for e in examples]) for k in ("input_ids", "labels", "position_ids")}
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@functools.cache
def _slices_by_mask(cls: type) -> bool:
    """Whether `cls.forward` hands `logits_to_keep` to transformers' `slice_logits_to_keep`, whose 2-D boolean
    form keeps exactly the True positions and flattens them to (N, hidden) (transformers 5: "e.g. packed
    training"). A class that slices its own way is given no mask."""
    try:
        return "slice_logits_to_keep" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def keeps_head_positions(model) -> bool:
    """True when `model` (a DeepSpeed engine, a PeftModel or a transformers model) can run its LM head at chosen
    positions only. Prompt / p-tuning adapters put virtual tokens before the input, so a mask of the input's
    positions would not line up: those take every position's logits."""
    from peft import PeftModel

    net = getattr(model, "module", model)  # the DeepSpeed engine's module
    if isinstance(net, PeftModel):
        if net.active_peft_config.is_prompt_learning:
            return False
        net = net.get_base_model()
    return _slices_by_mask(type(net))


def labelled_logps(model, labels: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of log p over the labelled tokens and their count, as `sequence_logps`. Where the model
    allows it (`keeps_head_positions`) its LM head runs only at the positions that predict a labelled token: a
    prompt's positions, the last one and padding get no vocabulary-wide logits. With SmolLM2's 49,152-token
    vocabulary, a plain loop fine-tuning it on gpteacher code trains 1.28x (full) and 1.23x (LoRA) the tokens per
    second of the same loop taking every position's logits (benchmarks/results/train_throughput_smollm2_{full,lora}.md;
    1.40x and 1.37x in the runs of 27057e1). Otherwise every position's
    logits are computed and those of virtual tokens dropped."""
    if keeps_head_positions(model):
        logits = model(**inputs, use_cache=False, logits_to_keep=head_positions(labels)).logits
        return kept_sequence_logps(logits, labels)
    logits = model(**inputs, use_cache=False).logits
    # Prompt / p-tuning (peft) put their virtual tokens before the input: their logits predict nothing here.
    return sequence_logps(logits[:, logits.shape[1] - labels.shape[1] :], labels)


def lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy, the mean over the labelled tokens of the batch. A batch with no labelled token
    gives a zero loss that still depends on the model, so backward and DeepSpeed's hooks run on every rank."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    lp, n = labelled_logps(model, batch["labels"], **inputs)
    n_all = int(n.sum())
    if n_all == 0:
        return lp.sum() * 0.0, {"target_tokens": 0.0}
    return -lp.sum() / n_all, {"target_tokens": float(n_all)}


class Reference:
    """The frozen reference policy of dpo, grpo and ppo, held by the method's instance (one per run), not
    hung on the model. Under a peft adapter it is the same model with its adapter disabled
    (`PeftModel.disable_adapter()`, no second copy in memory). Under `full` / `freeze` it is a frozen copy
    of the base taken when the base is loaded (`keep`): not a submodule, so never trained, partitioned by
    ZeRO-3 or saved."""

    def __init__(self) -> None:
        self.copy: torch.nn.Module | None = None

    def keep(self, model, spec, path, dtype) -> None:
        """Called by the method's `load_base` with the base it just loaded from `path`, before any head is
        added. Training loads the job's starting model, so the copy is of it. A finished full run loaded
        later (`ftray eval`, whose `path` is the run's own model/) is judged against the model it started
        from (`spec.model.path`), which is then loaded: a copy of itself would tie every comparison."""
        self.copy = None
        if spec.adapter.kind in PEFT_KINDS:
            return
        from ftray.models.load import resolve

        start = resolve(spec.model.path, spec.model.tokenizer).base
        ref = copy.deepcopy(model) if start == str(path) else load_causal_lm(start, dtype, spec)
        self.copy = ref.eval().requires_grad_(False)

    @contextlib.contextmanager
    def _net(self, model, device):
        """The reference to call: the peft model with its adapter disabled, or the frozen copy on `device`."""
        from peft import PeftModel

        net = getattr(model, "module", model)  # the DeepSpeed engine's module (maybe a PeftModel)
        if isinstance(net, PeftModel):
            with net.disable_adapter():
                yield net
            return
        if self.copy is None:
            raise RuntimeError("no reference model: the base was not loaded by this method instance's load_base")
        yield self.copy.to(device)

    @torch.no_grad()
    def logps(self, model, labels: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """`labelled_logps` of the reference: per-sequence log-prob sums and counts of the labelled tokens."""
        with self._net(model, labels.device) as net:
            return labelled_logps(net, labels, **inputs)

    @torch.no_grad()
    def logits(self, model, ids, mask, position_ids=None, keep: int = 0) -> torch.Tensor:
        """The reference's logits of every position, or of the last `keep` (transformers' `logits_to_keep`)."""
        extra = {} if position_ids is None else {"position_ids": position_ids}
        if keep:
            extra["logits_to_keep"] = keep
        with self._net(model, ids.device) as net:
            return net(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits
