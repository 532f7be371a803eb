"""One typed config for a run, and the named profiles.

Example::

    config = RunConfig.from_profile("smoke", model="embedded:smollm2-135m")
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from torsion.errors import TorsionError

# Every steering method, in the order `torsion analyze methods` compares them (methods.md)
COMPARED_METHODS = ("flat", "dense", "ablation", "weighted-ablation", "ace", "spline-a", "spline-b")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run computes. Recorded in ``manifest.json``."""

    profile: str = "quick"
    model: str = "embedded:qwen2.5-coder-0.5b"
    dtype: str = "float32"
    device: str = "cpu"
    # prompts
    sources: tuple[str, ...] = ("donotanswer", "harmbench")
    n_per_source: int | None = 128
    holdout_fraction: float = 0.2
    seed: int = 0
    # generation and labels
    max_new_tokens: int = 32
    temperature: float = 0.0
    # "auto": torsion.generate.auto_batch_size (the measured throughput plateau, bounded by free memory)
    generation_batch_size: int | str = "auto"
    judge: str = "rules"
    # capture
    components: tuple[str, ...] = ("resid", "attn", "mlp")
    positions: tuple[str, ...] = ("last", "post_instruction")
    capture_batch_size: int = 16
    # vectors
    methods: tuple[str, ...] = ("md", "rmd", "wrmd", "pca", "probe")
    ridge_lambda: float = 1e-2
    ridge_lambda_mode: str = "relative"
    # rotation controls
    bootstrap: int = 1000
    null_permutations: int = 200
    split_halves: int = 50
    # causal analyses on the model (methods.md: propagation, random-direction control)
    propagation_prompts: int = 16
    random_directions: int = 50
    # the random control steers the last prompt token and replays only that token for each of its
    # 102 directions per layer (benchmarks/results/random_control.json: 9.4x less CPU time than the
    # all-position replay per prompt, block and direction), so 32 probe prompts cost less than the
    # 12 the all-position path could afford
    random_control_prompts: int = 32
    # the steering-method comparison (`torsion analyze methods`); () skips the stage. Each method and
    # objective runs a strength search plus curve points on the holdout: hours on CPU for all seven
    compare_methods: tuple[str, ...] = ()
    compare_trials: int = 12
    compare_curve_points: int = 5

    @classmethod
    def from_profile(cls, profile: str = "quick", **overrides: object) -> "RunConfig":
        if profile not in PROFILES:
            raise TorsionError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TorsionError(f"unknown config field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(cls(), profile=profile, **{**PROFILES[profile], **overrides})

    def to_dict(self) -> dict:
        record = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in record.items()}


PROFILES: dict[str, dict] = {
    # 48 prompts, short responses, reduced resampling: mechanics, not science
    "smoke": {"n_per_source": 24, "max_new_tokens": 24, "bootstrap": 200, "null_permutations": 100,
              "split_halves": 20, "propagation_prompts": 8, "random_directions": 10, "random_control_prompts": 8},
    # 256 prompts (128 per source): the default
    "quick": {},
    # every prompt of both sources, and the steering-method comparison; hours on CPU, minutes on a GPU
    "paper": {"n_per_source": None, "max_new_tokens": 64, "random_control_prompts": 64,
              "compare_methods": COMPARED_METHODS},
}
