"""The flags of train.py and distill.py, as config dataclasses (runtime/config.py turns them into CLI flags).

`SessionConfig` holds what every training script has: the run folder, the device and precision, the model loading,
prompt lengths, the optimizer's shared settings, evaluation, checkpoints and logging, with their checks.
`TrainConfig` (warm-up SFT and GRPO + SAM) and `DistillConfig` (teacher -> students) add their own. A field a
subclass declares again keeps its place and takes the subclass's default and help. ablate.py checks train.py
command lines against `TrainConfig` before launching them.
"""

from dataclasses import dataclass

from grm_kernels.distill_kl import KINDS
from grm_kernels.policy_loss import AGG_MODES
from runtime.config import ConfigError, check_run_name
from runtime.data import BUILTIN_DIR
from runtime.parallel import STRATEGIES
from runtime.reader import DEFAULT_READER, DEFAULT_STUDENT
from sam.advantage import METHODS
from sam.mask import POLICIES
from sam.prompt import FORMATS
from sam.segment import SEGMENTERS
from sam.verdict import SOURCES

STAGES = ("sft", "rl")  # train.py's stages, in order
STUDENTS = ("reasoning", "label")  # distill.py's students
LOSSES = ("seq",) + KINDS  # distill.py's losses


# the largest learning rate AdamW's float32 arithmetic takes: its first step is lr / (1 - beta1) = 10 lr (and its
# decoupled decay lr * weight decay); a larger rate dies inside torch's optimizer instead of as a flag error
MAX_LR = 3.4e37


def check_lr(value: float, flag: str, weight_decay: float) -> None:
    need(
        0 < value <= MAX_LR,
        f"{flag} must be > 0 and at most {MAX_LR:g} (AdamW's float32 step is 10x it), got {value:g}",
    )
    need(
        value * weight_decay <= 10 * MAX_LR,
        f"{flag} {value:g} x --weight-decay {weight_decay:g} must be at most {10 * MAX_LR:g} (AdamW's float32 decay)",
    )


def need(cond, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def comma_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


@dataclass
class SessionConfig:
    # run
    name: str = "run"  # run name: everything is written under <out_dir>/<name>/
    out_dir: str = "runs"  # parent folder of the runs
    data_dir: str = BUILTIN_DIR  # folder of the JSONL splits (the built-in benchmark is generated there if missing)
    device: str = "auto"  # auto (cuda if available), cpu, cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    attention: str = "auto"  # auto (flash_attention_2 if installed on GPU, else sdpa), sdpa, eager
    impl: str = "auto"  # kernels: auto (Triton on CUDA, reference on CPU), triton, ref
    parallel: str = "auto"  # under torchrun: fsdp (FSDP2, sharded), ddp (replicated), auto (fsdp where available)
    seed: int = 0  # seed for model init, data order and sampling (rank r samples with its own stream)
    trust_remote_code: bool = False  # allow custom model code from the model directories
    max_prompt_tokens: int = 512  # longer prompts follow --long-prompts
    long_prompts: str = "error"  # error (stop before training) or skip (leave out and count)
    max_new_tokens: int = 160  # completion budget for sampling (training and evaluation)
    prompts_per_step: int = 16  # P: prompts per step
    top_p: float = 1.0  # nucleus threshold of the training samples
    micro_batch: int = 32  # sequences per forward/backward pass (gradient accumulation over the rest)
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clip
    lr_schedule: str = "cosine"  # constant, linear or cosine decay to 10% after warm-up
    # evaluation
    val_split: str = "val"  # validation split
    val_limit: int = 200  # validation records used (0 = all)
    eval_every: int = 10  # evaluate on validation every N steps (and at the end)
    eval_temperature: float = 0.0  # evaluation sampling temperature (0 = greedy)
    eval_batch_size: int = 128  # prompts per evaluation batch
    test_splits: str = "test_random,test_longtail"  # splits evaluated at the end ("" = none)
    test_limit: int = 0  # test records used per split (0 = all)
    # checkpoints and logging
    save_every: int = 20  # write the resumable checkpoint every N steps (and at the end)
    resume: bool = False  # continue runs/<name> from its last checkpoint
    halt_after: int = 0  # stop (checkpointed) after N steps in this invocation, as if preempted (0 = never)
    progress: bool = True  # show a progress bar
    tensorboard: bool = False  # also log to runs/<name>/tb when tensorboard is installed

    def __post_init__(self):
        check_run_name(self.name)
        need(self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}")
        need(self.dtype in ("auto", "fp32", "bf16"), f"--dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        need(
            self.attention in ("auto", "sdpa", "eager", "flash_attention_2"),
            "--attention: auto, sdpa, eager or flash_attention_2",
        )
        need(self.impl in ("auto", "triton", "ref"), f"--impl must be auto, triton or ref, got {self.impl!r}")
        need(self.parallel in STRATEGIES, f"--parallel must be one of {STRATEGIES}, got {self.parallel!r}")
        need(self.long_prompts in ("error", "skip"), "--long-prompts must be error or skip")
        need(self.lr_schedule in ("constant", "linear", "cosine"), "--lr-schedule: constant, linear or cosine")
        for name in (
            "prompts_per_step",
            "micro_batch",
            "max_new_tokens",
            "max_prompt_tokens",
            "eval_batch_size",
            "save_every",
            "eval_every",
        ):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        for name in ("val_limit", "test_limit", "halt_after"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0")
        need(0 < self.top_p <= 1, "--top-p must be in (0, 1]")
        need(0 <= self.eval_temperature < float("inf"), "--eval-temperature must be a finite number >= 0")
        need(self.weight_decay >= 0 and self.grad_clip > 0, "need --weight-decay >= 0 and --grad-clip > 0")

    @property
    def test_list(self) -> list[str]:
        return comma_list(self.test_splits)


@dataclass
class TrainConfig(SessionConfig):
    # run
    name: str = "default"  # run name: everything is written under <out_dir>/<name>/
    model: str = DEFAULT_READER  # a local Hugging Face model folder (default: the shipped reader) or a preset (random)
    init: str = ""  # start from this checkpoint folder instead of --model (e.g. runs/default/sft)
    tokenizer: str = ""  # tokenizer folder (default: <data_dir>/tokenizer for presets, else the model's)
    stages: str = "sft,rl"  # comma list of stages to run, in order: sft, rl
    fmt: str = "criteria"  # reasoning format: criteria (7 steps, 3 boxes), generic (3 steps), label (answer only)
    instruction: str = "auto"  # instruction text: full, none, auto (the model folder's prompt.json, none for presets)
    rules: str = ""  # business rules JSON {name: text} (default: the built-in rules)
    max_new_tokens: int = 96  # completion budget for sampling (RL and evaluation)
    # warm-up SFT
    sft_split: str = "sft"  # split with reasoning traces (or gold values to render them from)
    sft_epochs: float = 6.0  # passes over the SFT split
    sft_steps: int = 0  # SFT optimizer steps instead of --sft-epochs (0 = from the epochs)
    sft_batch_size: int = 16  # sequences per SFT optimizer step
    sft_lr: float = 3e-3  # peak SFT learning rate
    sft_warmup: int = 20  # SFT warm-up steps
    # GRPO + SAM
    rl_split: str = "rl"  # label-only split for RL prompts
    rl_steps: int = 150  # RL steps (rollout batches)
    prompts_per_step: int = 16  # P: prompts per RL step
    group_size: int = 8  # G: samples per prompt
    mu: int = 1  # inner epochs: optimizer steps per rollout batch
    rl_lr: float = 3e-4  # peak RL learning rate
    rl_warmup: int = 5  # RL warm-up steps
    temperature: float = 1.0  # rollout sampling temperature (log-probs use it too)
    top_p: float = 1.0  # rollout nucleus threshold
    policy: str = "sam"  # masking policy: none, sam, soft, sequence, token, random (control: sam's masked fraction)
    segmenter: str = "boxes"  # segments: boxes (paper), steps, box_tokens (with --policy token), none
    verdicts: str = "box"  # box (each box vs the label, paper), gold-box (box 1/2 vs gold initial/calibrated), gold
    exception: bool = True  # SAM's exception: keep both when calibration fixed a wrong initial score
    alpha: float = 0.5  # weight a masked segment keeps under --policy soft
    adv_method: str = "grpo"  # grpo, drgrpo, rloo
    adv_clamp: float = 3.0  # clamp advantages to [-c, c] (0 = off)
    zero_variance: str = "keep"  # groups with equal rewards: keep (advantage 0) or drop (out of the loss)
    reward_correct: float = 1.0  # reward for a correct final label
    malformed_penalty: float = 0.0  # subtracted from the reward of a malformed completion
    ordinal_reward: bool = False  # partial credit for a near-miss label
    clip_low: float = 0.2  # PPO clip epsilon below 1
    clip_high: float = 0.28  # PPO clip epsilon above 1
    dual_clip: float = 3.0  # dual-clip constant for negative advantages (0 = off)
    kl_coef: float = 0.0  # k3 KL to the frozen RL-start model (0 = off, no reference model)
    agg: str = "seq-mean-token-mean"  # loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum
    # evaluation
    val_limit: int = 500  # validation records used (0 = all)
    eval_every: int = 25  # evaluate on validation every N RL steps (and at the end of each stage)
    select: str = "last"  # RL model evaluated on the tests: last (the final step) or best (best validation accuracy)
    eval_temperature: float = 0.0  # evaluation sampling temperature (0 = greedy; the authors validate at 0.6)
    eval_samples: int = 1  # with --eval-temperature > 0: samples per record, metrics averaged over them
    test_splits: str = "test_random,test_longtail"  # splits evaluated after each stage ("" = none)
    # checkpoints
    save_every: int = 20  # write the resumable checkpoint every N steps (and at the end of each stage)

    def __post_init__(self):
        super().__post_init__()
        stages = self.stage_list
        need(stages and all(s in STAGES for s in stages), f"--stages: choose from {STAGES}, got {self.stages!r}")
        need(stages == [s for s in STAGES if s in stages], f"--stages: each at most once, in the order {STAGES}")
        need(self.fmt in FORMATS, f"--fmt must be one of {FORMATS}, got {self.fmt!r}")
        need(self.instruction in ("auto", "full", "none"), "--instruction must be auto, full or none")
        need(self.policy in POLICIES, f"--policy must be one of {POLICIES}, got {self.policy!r}")
        need(self.segmenter in SEGMENTERS, f"--segmenter must be one of {SEGMENTERS}, got {self.segmenter!r}")
        need(
            (self.policy == "token") == (self.segmenter == "box_tokens"),
            "--policy token and --segmenter box_tokens go together (the token policy masks the box tokens alone)",
        )
        need(self.verdicts in SOURCES, f"--verdicts must be one of {SOURCES}, got {self.verdicts!r}")
        need(self.verdicts == "box" or self.fmt == "criteria", f"--verdicts {self.verdicts} needs --fmt criteria")
        need(self.adv_method in METHODS, f"--adv-method must be one of {METHODS}")
        need(self.zero_variance in ("keep", "drop"), "--zero-variance must be keep or drop")
        need(self.agg in AGG_MODES, f"--agg must be one of {AGG_MODES}, got {self.agg!r}")
        need(self.group_size >= 2, "--group-size must be >= 2 (advantages are relative to the group)")
        for name in ("mu", "sft_batch_size"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        for name in ("rl_steps", "sft_steps", "sft_warmup", "rl_warmup"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0")
        need(self.sft_epochs > 0, "--sft-epochs must be > 0")
        check_lr(self.sft_lr, "--sft-lr", self.weight_decay)
        check_lr(self.rl_lr, "--rl-lr", self.weight_decay)
        need(0 < self.temperature < float("inf"), "--temperature must be a finite number > 0 (RL samples its rollouts)")
        need(
            self.policy != "random" or (self.fmt == "criteria" and self.segmenter in ("boxes", "steps")),
            "--policy random needs --fmt criteria and --segmenter boxes or steps",
        )
        need(self.select in ("last", "best"), f"--select must be last or best, got {self.select!r}")
        need(self.eval_samples >= 1, "--eval-samples must be >= 1")
        need(
            self.eval_samples == 1 or self.eval_temperature > 0,
            "--eval-samples > 1 needs --eval-temperature > 0 (greedy decoding gives the same answer every time)",
        )
        need(0 <= self.alpha <= 1, "--alpha must be in [0, 1]")
        need(self.dual_clip == 0 or self.dual_clip > 1, "--dual-clip must be > 1, or 0 to turn it off")
        need(0 <= self.clip_low < 1 and self.clip_high >= 0, "need 0 <= --clip-low < 1 and --clip-high >= 0")
        need(
            self.kl_coef >= 0 and self.adv_clamp >= 0 and self.malformed_penalty >= 0,
            "--kl-coef, --adv-clamp and --malformed-penalty must be >= 0",
        )

    @property
    def stage_list(self) -> list[str]:
        return comma_list(self.stages)


@dataclass
class DistillConfig(SessionConfig):
    # run
    name: str = "distill"  # run name: everything is written under <out_dir>/<name>/
    teacher: str = "runs/default/best"  # teacher checkpoint folder (train.py's output, or any local HF model)
    student: str = DEFAULT_STUDENT  # a local HF model folder (default: the shipped nano reader), a preset or auto
    students: str = "reasoning,label"  # students to train: reasoning (teacher's format), label (answer only)
    split: str = "rl"  # split whose prompts are distilled on (labels are not used for training)
    seed: int = 0  # seed for student init, data order and sampling (rank r samples with its own stream)
    # distillation
    loss: str = "seq"  # seq (teacher-sampled traces, NLL), fkl, rkl, jsd (token-level over the vocabulary)
    beta: float = 0.5  # jsd mixture weight of the teacher (0 = fkl, 1 = rkl)
    kl_temperature: float = 1.0  # temperature of both models' softmax inside the token-level losses
    on_policy: float = 0.0  # fraction of each batch the reasoning student samples itself (token-level losses)
    sample_temperature: float = 0.6  # sampling temperature of the training traces (the teacher is evaluated at 0.6)
    top_p: float = 1.0  # nucleus threshold of the training traces
    steps: int = 160  # distillation steps
    prompts_per_step: int = 32  # P: prompts (one trace each) per step
    lr: float = 3e-3  # peak learning rate of both students (chosen on validation for the nano reader)
    warmup: int = 10  # warm-up steps
    # evaluation
    eval_every: int = 40  # evaluate the students on validation every N steps (and at the end)
    eval_temperature: float = 0.6  # sampling temperature of evaluation (0 = greedy), as train.py
    test_splits: str = "test_random,test_longtail"  # splits of the final report ("" = none)
    latency_examples: int = 16  # test prompts timed one at a time for the latency column (0 = skip)
    # checkpoints
    save_every: int = 40  # write the resumable checkpoint every N steps (and at the end)

    def __post_init__(self):
        super().__post_init__()
        students = self.student_list
        need(
            students and all(s in STUDENTS for s in students),
            f"--students: a comma list of {STUDENTS}, got {self.students!r}",
        )
        need(len(set(students)) == len(students), "--students: each at most once")
        need(self.loss in LOSSES, f"--loss must be one of {LOSSES}, got {self.loss!r}")
        need(0 <= self.beta <= 1, "--beta must be in [0, 1]")
        need(self.kl_temperature > 0 and self.sample_temperature > 0, "temperatures must be > 0")
        need(0 <= self.on_policy <= 1, "--on-policy must be in [0, 1]")
        need(
            self.on_policy == 0 or self.loss != "seq",
            "--on-policy needs a token-level --loss (fkl, rkl, jsd): seq learns the teacher's samples",
        )
        need(
            self.on_policy == 0 or "reasoning" in students,
            "--on-policy applies to the reasoning student, which --students leaves out",
        )
        need(
            self.on_policy < 1 or "label" not in students,
            "--on-policy 1 leaves no teacher traces for the label "
            "student; train it with --students label alone or lower --on-policy",
        )
        need(self.steps >= 1, "--steps must be >= 1")
        for name in ("warmup", "latency_examples"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0")
        check_lr(self.lr, "--lr", self.weight_decay)

    @property
    def student_list(self) -> list[str]:
        return comma_list(self.students)
