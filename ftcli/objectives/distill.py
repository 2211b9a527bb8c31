"""`distill`: knowledge distillation from a teacher model (Hinton et al. 2015; reverse KL as in MiniLLM, arXiv
2306.08543), on the trained span of SFT rows.

Per trained token, with p = softmax(z_teacher / T) and q = softmax(z_student / T):
    loss = α · CE(student, the data's token) + (1 − α) · T² · KL
    KL = Σ p (log p − log q)   (kl: forward, the default)    or    Σ q (log q − log p)   (kl: reverse)
summed over the step's trained tokens and divided by their count, like SFT's loss. `ce` and `kl` are logged apart.

The teacher (`teacher: MODEL_OR_RUN`: a built-in alias, a model folder, a run or an exported model) runs without
gradients on the same batch. With `teacher: {model: ..., precompute: true, top_k: 64}` its top-k log-probabilities
(at temperature T) of every trained token are computed once before training, cached on disk by content, and the KL
is taken over k + 1 outcomes: the k tokens and "any other token" (the teacher's remaining mass against the
student's). That is a true KL of the coarsened distributions (never above the full KL, 0 when they agree, equal to
it when k covers the vocabulary). `answers: teacher` replaces every training row's answer by the teacher's own greedy
answer (generated once, cached), so the student learns from the teacher on prompts alone (sequence-level
distillation): the training rows' answers are never read. Validation rows keep the data's answers, so accuracy and
the loss on them measure the task, not agreement with the teacher.

Teacher and student must share the tokenizer: their vocabularies and special tokens are compared (not the sizes of
their embedding matrices); logits beyond the tokenizer (padded embedding rows) are ignored.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal, Union

from pydantic import Field, field_validator

from ftcli.errors import UserError
from ftcli.objectives.base import Objective, ObjectiveParams

TEACHER_CACHE_VERSION = "1"


class TeacherParams(ObjectiveParams):
    """The teacher and how its outputs reach the student."""

    model: str = Field(description="a built-in alias, a model folder, a run folder or an exported model")
    precompute: bool = Field(False, description="compute the teacher's top-k log-probs once, cached, instead of "
                                                "running it on every step")
    top_k: int = Field(64, ge=1, description="with precompute: log-probs kept per trained token")


class DistillParams(ObjectiveParams):
    """Distil a teacher's next-token distribution into the student."""

    name: Literal["distill"] = "distill"
    teacher: Union[str, TeacherParams]
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the data's cross-entropy; 1 − alpha goes to the KL")
    temperature: float = Field(2.0, gt=0, description="T: both distributions are softened by it; the KL is scaled by T²")
    kl: Literal["forward", "reverse"] = Field("forward", description="KL(teacher ‖ student) or KL(student ‖ teacher)")
    answers: Literal["data", "teacher"] = Field(
        "data", description="the completions trained on: the data's, or the teacher's own greedy answers")
    answer_tokens: int = Field(64, ge=1, description="answers: teacher — the longest answer generated")

    @field_validator("teacher", mode="before")
    @classmethod
    def _teacher_as_mapping(cls, v):
        return {"model": v} if isinstance(v, str) else v

    def resolve_paths(self, fix) -> None:
        self.teacher.model = fix(self.teacher.model)


def kl_terms(student_logits, teacher_logits, T: float, kl: str) -> torch.Tensor:
    """Per-position KL between the teacher's and the student's softened distributions (full vocabulary)."""
    import torch
    import torch.nn.functional as F

    s = F.log_softmax(student_logits / T, dim=-1)
    t = F.log_softmax(teacher_logits / T, dim=-1)
    if kl == "forward":
        return (t.exp() * (t - s)).sum(-1)
    return (s.exp() * (s - t)).sum(-1)


def topk_kl_terms(student_logits, ids, teacher_logp, teacher_tail, T: float, kl: str) -> torch.Tensor:
    """The KL over the teacher's top-k tokens plus one bucket for every other token (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    s_all = F.log_softmax(student_logits / T, dim=-1)
    s_tail = s_all.scatter(-1, ids, float("-inf")).logsumexp(-1)
    p = torch.cat([teacher_logp, teacher_tail[:, None]], -1)
    q = torch.cat([s_all.gather(-1, ids), s_tail[:, None]], -1)
    if kl == "reverse":
        p, q = q, p
    return torch.where(p > float("-inf"), p.exp() * (p - q), 0.0).sum(-1)  # an empty bucket adds nothing


def same_tokenizer(a, b) -> str | None:
    """None when two tokenizers encode alike (vocabulary and special tokens), else what differs."""
    if a.get_vocab() != b.get_vocab():
        va, vb = a.get_vocab(), b.get_vocab()
        only = sorted(set(va) ^ set(vb))[:3]
        return (f"vocabularies differ ({len(va)} vs {len(vb)} tokens" + (f"; e.g. {only}" if only else
                                                                        "; the same tokens, other ids") + ")")
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(a, name, None) != getattr(b, name, None):
            return f"{name} differs ({getattr(a, name, None)!r} vs {getattr(b, name, None)!r})"
    if sorted(a.all_special_tokens) != sorted(b.all_special_tokens):
        return "special tokens differ"
    return None


class Distill(Objective):
    name = "distill"
    metrics = ("ce", "kl")

    def __init__(self, params: DistillParams):
        super().__init__(params)
        self.teacher = None
        self.vocab = 0
        self.info: dict = {}

    # -- before training -------------------------------------------------------------------------------------
    def preflight(self, recipe, tokenizer) -> None:
        from ftcli import models

        spec = self.params.teacher.model
        teacher_tok = models.load_tokenizer(spec, key="objective.teacher")
        problem = same_tokenizer(tokenizer, teacher_tok)
        if problem:
            raise UserError(f"objective.teacher: {spec} and the student {recipe.base_model} do not share a "
                            f"tokenizer: {problem}. Distillation compares next-token distributions token by token, "
                            "so both must tokenize alike.")

    def prepare(self, model, ctx, data) -> None:
        from ftcli import models

        p: DistillParams = self.params
        self.vocab = len(ctx.tokenizer)
        self.info = {"teacher": p.teacher.model, "kl": p.kl, "temperature": p.temperature, "alpha": p.alpha,
                     "answers": p.answers}
        if ctx.dry_run:
            return
        self.teacher = models.load_model(p.teacher.model, log=ctx.log, key="objective.teacher").eval()
        self.teacher.requires_grad_(False)
        if p.answers == "teacher":
            self._teacher_answers(ctx, data)
        if p.teacher.precompute:
            self._precompute(ctx, data)
            self.teacher = None  # its outputs are all that is needed now

    def _autocast(self, ctx):
        from ftcli.evaluate import model_device
        from ftcli.runtime import autocast as autocast_for

        return autocast_for(ctx.recipe.training.precision, model_device(self.teacher).type)

    def _teacher_answers(self, ctx, data) -> None:
        """Every training row's last answer replaced by the teacher's greedy answer to its prompt; re-encoded.
        The validation rows keep their answers (the held-out measure of the task)."""
        from dataclasses import replace

        from ftcli.data import encode_split
        from ftcli.evaluate import generate, stop_token_ids

        enc = data.encoder
        for split in [data.train]:
            prompts = [ex.prompt for ex in split.examples]
            key = self._key("answers", ctx, json.dumps(prompts, sort_keys=True), self.params.answer_tokens)
            path = _cache(ctx, "distill-answers", key, ".json")
            if path.is_file():
                answers = json.loads(path.read_text())
            else:
                ctx.log(f"distill: the teacher answers {len(prompts)} {split.name} prompts (once; cached in {path})")
                answers = generate(self.teacher, ctx.tokenizer, [enc.prompt_ids(pr) for pr in prompts],
                                   max_new_tokens=self.params.answer_tokens,
                                   stop_ids=stop_token_ids(ctx.tokenizer, enc), autocast=self._autocast(ctx))
                from ftcli import atomic

                atomic.write_json(path, answers)
            examples = [replace(ex, messages=ex.prompt + [{"role": "assistant", "content": a}], choices=None,
                                gold=None) for ex, a in zip(split.examples, answers)]
            new = encode_split(split.name, examples, enc, f"{split.source} (teacher's answers)")
            split.encoded, split.examples, split.stats = new.encoded, new.examples, new.stats

    def _precompute(self, ctx, data) -> None:
        """The teacher's top-k log-probs (temperature T) and remaining mass per trained token, cached by content."""
        import torch

        from safetensors.torch import load_file, save_file

        from ftcli import atomic
        from ftcli.data.tokenize import pad_id
        from ftcli.evaluate import model_device, to_device
        from ftcli.loss import map_head, trained_hidden

        p: DistillParams = self.params
        k, T = p.teacher.top_k, p.temperature
        for split in [s for s in (data.train, data.validation) if s is not None]:
            seqs = [s for u in split.encoded for s in u.sequences]
            key = self._key("topk", ctx, json.dumps([[s.input_ids, s.trained] for s in seqs]), k, T)
            path = _cache(ctx, "distill-topk", key, ".safetensors")
            if not path.is_file():
                ctx.log(f"distill: the teacher's top-{k} log-probs of {len(seqs)} {split.name} rows (once; cached)")
                ids, logp, tail = [], [], []
                device = model_device(self.teacher)
                with torch.no_grad():
                    for s in range(0, len(seqs), ctx.recipe.training.batch_size):
                        part = seqs[s : s + ctx.recipe.training.batch_size]
                        batch = to_device(self.collate(part, pad_id(ctx.tokenizer), False, ctx.recipe.data.max_len),
                                          device)
                        with self._autocast(ctx)():
                            h, _ = trained_hidden(self.teacher, batch)
                            out = map_head(self.teacher, h, lambda z: self._topk(z, k, T))
                        ids.append(out[:, :k].long())
                        logp.append(out[:, k : 2 * k])
                        tail.append(out[:, 2 * k])
                saved = {"ids": torch.cat(ids).to(torch.int32), "logp": torch.cat(logp), "tail": torch.cat(tail)}
                with atomic.file(path) as tmp:
                    save_file(saved, str(tmp))
            saved = load_file(str(path))
            at = 0
            for seq in seqs:
                n = seq.n_trained
                seq.aux["teacher"] = (saved["ids"][at : at + n].long(), saved["logp"][at : at + n],
                                      saved["tail"][at : at + n])
                at += n
        self.info["precomputed_top_k"] = k

    def _topk(self, logits, k: int, T: float) -> torch.Tensor:
        """[ids, log-probs, log of the remaining mass] of the k most likely tokens, packed in one float tensor."""
        import torch
        import torch.nn.functional as F

        logp = F.log_softmax(logits[:, : self.vocab] / T, dim=-1)
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tail = logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)  # -inf when k covers the vocabulary
        return torch.cat([top.indices.float(), top.values, tail[:, None]], dim=-1)

    def _key(self, what: str, ctx, *parts) -> str:
        from ftcli.models import fingerprint

        h = hashlib.sha256(json.dumps({"v": TEACHER_CACHE_VERSION, "what": what,
                                       "teacher": fingerprint(self.params.teacher.model),
                                       "precision": ctx.recipe.training.precision}, sort_keys=True).encode())
        for part in parts:
            h.update(str(part).encode())
        return h.hexdigest()[:40]

    # -- the loss --------------------------------------------------------------------------------------------
    def loss_sum(self, model, batch):
        import torch
        import torch.nn.functional as F

        from ftcli.evaluate import model_device
        from ftcli.loss import map_head, trained_hidden

        p: DistillParams = self.params
        T, V = p.temperature, self.vocab
        h, targets = trained_hidden(model, batch)
        if self.teacher is None:  # precomputed top-k, in the order of the trained tokens
            parts = [s.aux["teacher"] for s in batch.sequences]
            ids, logp, tail = (torch.cat([x[i] for x in parts]).to(h.device) for i in range(3))

            def terms(logits, targets, ids, logp, tail):
                logits = logits[:, :V]
                return torch.stack([F.cross_entropy(logits, targets, reduction="none"),
                                    topk_kl_terms(logits, ids, logp.float(), tail.float(), T, p.kl)], -1)

            per_token = map_head(model, h, terms, targets, ids, logp, tail)
        else:
            if model_device(self.teacher) != h.device:  # the student moved to an accelerator after prepare
                self.teacher.to(h.device)
            with torch.no_grad():
                th, _ = trained_hidden(self.teacher, batch)
            teacher_head = self.teacher.get_output_embeddings()

            def terms(logits, targets, th):
                with torch.no_grad():
                    t_logits = teacher_head(th).to(logits.dtype)[:, :V]
                logits = logits[:, :V]
                return torch.stack([F.cross_entropy(logits, targets, reduction="none"),
                                    kl_terms(logits, t_logits, T, p.kl)], -1)

            per_token = map_head(model, h, terms, targets, th)
        ce, kl = per_token.sum(0)
        loss = p.alpha * ce + (1 - p.alpha) * T * T * kl
        return loss, {"ce": ce.detach(), "kl": kl.detach()}

    def memory(self, *, total, strategy):  # a teacher of the student's size, in float32, unless precomputed
        return {} if self.params.teacher.precompute else {"distillation teacher (if the student's size)": total * 4}

    def describe(self) -> dict:
        return self.info


def _cache(ctx, folder: str, key: str, suffix: str):
    from ftcli.models import cache_root

    return cache_root() / folder / f"{key}{suffix}"
