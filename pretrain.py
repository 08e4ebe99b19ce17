"""Pretrain the reader: a small LM that has read the built-in world's text, before any trace or label.

    python pretrain.py                                    # rebuilds models/reader (the shipped one; see README)
    python pretrain.py --out /tmp/reader --steps 200      # a short one
    python train.py --model /tmp/reader                   # the main job from it (models/reader by default)

The paper's warm-up starts from a pretrained LLM that can read; a model trained from random weights on the
warm-up traces alone never learned to compare the note with the query (docs/LOG.md). This script gives the `tiny`
preset that skill from the world's text alone (runtime/reader.py): fresh notes and queries from a stream of their
own, next-token prediction plus two histogram targets on every token (how often the token occurred before in the
text, and in the note's content), through a probe head dropped on saving. The corpus holds no label, rubric score,
business-rule case or trace. `--preset nano --out models/reader-nano` builds the distillation students' reader.
The folder it writes is a Hugging Face model (safetensors) with the benchmark's tokenizer, prompt.json (no
instruction text) and reader.json (recipe, seed, world version, generator fingerprint, vocabulary hash, held-out
metrics, wall time); train.py and distill.py refuse a reader made for another world version or vocabulary.

Runs on the CPU (2 threads) or a GPU; the shipped reader was built on the 2-core CPU with the defaults
(docs/LOG.md has the command, commit and wall time). Not resumable: a build is sized to well under an hour.
"""

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.synthetic import VERSION, fingerprint
from model.hf import PRESETS, ModelLoadError, build_preset, load_tokenizer, num_parameters, prepare, save_pretrained
from runtime.checkpoint import PromptSettings, atomic_folder, write_prompt_settings
from runtime.config import ConfigError, parse_config
from runtime.configs import check_lr
from runtime.data import BUILTIN_DIR, ensure_builtin
from runtime.reader import DEFAULT_READER, READER_FILE, corpus_stream, earlier_counts, vocabulary_hash


@dataclass
class PretrainConfig:
    out: str = DEFAULT_READER  # folder the reader is written to (replaced atomically at the end)
    data_dir: str = BUILTIN_DIR  # benchmark whose tokenizer the reader uses (the built-in one is generated if missing)
    preset: str = "tiny"  # model shape (model/hf.py PRESETS)
    steps: int = 2000  # optimizer steps
    batch_size: int = 32  # texts per step
    lr: float = 3e-3  # peak learning rate: linear warm-up, then cosine decay to 10%
    warmup: int = 50  # warm-up steps
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clip
    count_cap: int = 7  # histogram classes: 0 .. cap earlier occurrences (cap means cap or more)
    count_weight: float = 1.0  # weight of the histogram loss beside the next-token loss
    eval_every: int = 250  # held-out metrics every N steps (and at the end)
    eval_texts: int = 256  # held-out texts (a stream of their own)
    max_positions: int = 640  # the model's position budget (train.py's prompts + completions fit in it)
    seed: int = 0  # model initialisation and the corpus streams
    device: str = "auto"  # auto (cuda if available), cpu, cuda
    progress: bool = True  # show a progress bar

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("steps", "batch_size", "eval_every", "eval_texts", "count_cap", "max_positions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 < self.lr <= 1:
            raise ConfigError(f"--lr must be in (0, 1], got {self.lr}")
        check_lr(self.lr, "--lr", self.weight_decay)  # with a huge --weight-decay, AdamW's decay step overflows
        if self.warmup < 0 or self.weight_decay < 0 or self.grad_clip <= 0 or self.count_weight < 0:
            raise ConfigError("need --warmup >= 0, --weight-decay >= 0, --grad-clip > 0 and --count-weight >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        out = Path(self.out)
        if not out.resolve().name:
            raise ConfigError(f"--out {self.out!r}: not a folder name")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {self.out}: exists and is not a folder")
        # the build replaces --out as a whole: only an earlier reader (or an empty folder) may be replaced
        if out.is_dir() and any(out.iterdir()) and not (out / READER_FILE).exists():
            raise ConfigError(f"--out {self.out}: a folder that is not a reader (no {READER_FILE}); it is not replaced")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda, but CUDA is not available")


COUNTS = ("repeats", "mentions")  # the histogram targets: earlier occurrences in the text, in the note's content


def encode_batch(items: list[tuple[str, tuple[int, int]]], tok, cap: int, device):
    """(ids (B, L) right-padded, attention mask (B, L), count targets (B, L, 2): earlier occurrences of each
    position's token in the text and in the note's content, -100 on padding)."""
    enc = [tok(text, return_offsets_mapping=True) for text, _ in items]
    width = max(len(e["input_ids"]) for e in enc)
    ids = torch.full((len(items), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.bool)
    content = torch.zeros((len(items), width), dtype=torch.bool)
    for i, (e, (_, (lo, hi))) in enumerate(zip(enc, items)):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = True
        # a token belongs to the content when its characters overlap it: a word's piece carries the space before it
        # (" My"), which lies outside the content's span for its first word
        content[i, :n] = torch.tensor([a < hi and b > lo for a, b in e["offset_mapping"]])
    counts = torch.stack([earlier_counts(ids, mask, cap), earlier_counts(ids, content, cap)], dim=-1)  # (B, L, 2)
    counts = counts.masked_fill(~mask.unsqueeze(-1), -100)
    return ids.to(device), mask.long().to(device), counts.to(device)


def losses(model, probe, ids, mask, counts):
    """(next-token loss, histogram loss (mean of the two targets), count logits (B, L, 2, cap+1)) of one batch."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
    logits = model.lm_head(hidden[:, :-1])  # (B, L-1, V): small here (V ~ 1k); the kernels are for training runs
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    lm = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    count_logits = probe(hidden).unflatten(-1, (len(COUNTS), -1))  # (B, L, 2, cap+1)
    hist = F.cross_entropy(count_logits.flatten(0, 2), counts.flatten(), ignore_index=-100)
    return lm, hist, count_logits


@torch.no_grad()
def held_out(model, probe, batches) -> dict:
    """Next-token loss; for each count target, the accuracy on tokens seen 1-5 times before (what reading needs: a
    subject's mentions, a query word found in the note); the exact-count accuracy over every token is near 1 for
    free (most tokens are seen 0 or many times)."""
    model.eval()
    lm_sum, right, total = 0.0, torch.zeros(len(COUNTS)), torch.zeros(len(COUNTS))
    for ids, mask, counts in batches:
        lm, _, count_logits = losses(model, probe, ids, mask, counts)
        lm_sum += lm.item()
        rep = (counts >= 1) & (counts <= 5)  # (B, L, 2)
        right += ((count_logits.argmax(-1) == counts) & rep).sum((0, 1)).float().cpu()
        total += rep.sum((0, 1)).float().cpu()
    model.train()
    acc = (right / total.clamp(min=1)).tolist()
    return {"lm_loss": lm_sum / len(batches), **{f"{name}_acc": a for name, a in zip(COUNTS, acc)}}


def main(argv=None) -> int:
    cfg, _ = parse_config(PretrainConfig, argv, __doc__.split("\n")[0])
    started = time.perf_counter()
    device = torch.device(
        "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    )
    try:
        if cfg.data_dir == BUILTIN_DIR:
            ensure_builtin(cfg.data_dir)
        tok = load_tokenizer(Path(cfg.data_dir) / "tokenizer")
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(cfg.seed)
    model = prepare(
        build_preset(cfg.preset, tok, seed=cfg.seed, max_positions=cfg.max_positions),
        device=device,
        dtype=torch.float32,
        attention="sdpa",
    )
    probe = torch.nn.Linear(model.config.hidden_size, len(COUNTS) * (cfg.count_cap + 1)).to(device)
    params = list(model.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    texts = corpus_stream(cfg.seed, "pretrain")
    heldout_texts = corpus_stream(cfg.seed, "pretrain-heldout")
    heldout = [
        encode_batch([next(heldout_texts) for _ in range(min(64, cfg.eval_texts - lo))], tok, cfg.count_cap, device)
        for lo in range(0, cfg.eval_texts, 64)
    ]
    print(
        f"pretraining a {cfg.preset} reader ({num_parameters(model) / 1e6:.2f}M parameters) on world version "
        f"{VERSION}: {cfg.steps} steps of {cfg.batch_size} texts, lr {cfg.lr}, device {device}",
        flush=True,
    )
    history = []
    bar = tqdm(range(1, cfg.steps + 1), disable=not cfg.progress, desc="pretrain", dynamic_ncols=True)
    for step in bar:
        warm = step / cfg.warmup if step <= cfg.warmup else 1.0
        progress = max(0.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        lr = cfg.lr * min(warm, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        ids, mask, counts = encode_batch([next(texts) for _ in range(cfg.batch_size)], tok, cfg.count_cap, device)
        lm, hist, _ = losses(model, probe, ids, mask, counts)
        loss = lm + cfg.count_weight * hist
        if not torch.isfinite(loss):
            print(f"error: non-finite loss at step {step} (lower --lr); nothing was written", file=sys.stderr)
            return 3
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row = {"step": step, "lr": lr, **held_out(model, probe, heldout), "s": time.perf_counter() - started}
            history.append(row)
            line = f"step {step}: next-token loss {row['lm_loss']:.3f}, counts 1-5 right: "
            line += f"repeats {row['repeats_acc']:.3f}, mentions {row['mentions_acc']:.3f}, {row['s']:.0f} s"
            bar.write(line) if cfg.progress else print(line, flush=True)
    info = {
        "world_version": VERSION,
        "generator": fingerprint(),
        "vocabulary": vocabulary_hash(tok),
        "recipe": asdict(cfg),
        "command": "python pretrain.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "objectives": "next-token; earlier occurrences of each token in the text and in the note content (capped)",
        "parameters": num_parameters(model),
        "torch": torch.__version__,
        "history": history,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    with atomic_folder(Path(cfg.out)) as tmp:
        save_pretrained(model, tok, tmp)
        write_prompt_settings(tmp, PromptSettings(fmt="criteria", with_instruction=False))
        (tmp / READER_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {cfg.out} ({info['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
