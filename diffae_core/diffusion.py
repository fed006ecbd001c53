"""Gaussian diffusion: schedules, training loss, DDIM sampling and inversion.

The network predicts eps (official) or v = sqrt(a_t) eps - sqrt(1-a_t) x0 (``DiffusionConfig.prediction``);
the sampler turns either into (x0_hat, eps_hat), so DDIM and its inversion are the same for both.
Tables are computed in float64 and used in float32, as the official code. Networks are always called
with ORIGINAL timesteps (0..T-1), never with respaced indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .config import DiffusionConfig

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [B,...], t [B] int64) -> network output
MAX_STEPS = 1000
PREDICTIONS = ("eps", "v")

StepFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (x_t, t, index into the run's timesteps)


@runtime_checkable
class PreparedEpsFn(Protocol):
    """An eps_fn that a DDIM run first prepares for its timesteps, so that it can compute whatever depends
    only on them once per run (diffae_core.unet.ConditionedUNet: the decoder's time and z_sem conditioning)."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def for_timesteps(self, timesteps: torch.Tensor) -> StepFn: ...


def step_fn(eps_fn: EpsFn, timesteps: torch.Tensor) -> StepFn:
    """eps_fn as a function of (x_t, t, step index) for a run over ``timesteps`` [N]: prepared once when it
    is a :class:`PreparedEpsFn`, else called as ``eps_fn(x_t, t)``."""
    if isinstance(eps_fn, PreparedEpsFn):
        return eps_fn.for_timesteps(timesteps)
    return lambda x_t, t, step: eps_fn(x_t, t)


def beta_schedule(name: str, T: int = 1000) -> np.ndarray:
    """betas [T] float64. ``linear``: 1e-4..0.02 (scaled by 1000/T); ``cosine``; ``constX``: X*1000/T."""
    scale = 1000 / T
    if name == "linear":
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if name == "cosine":
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=np.float64
        )
    if name.startswith("const"):
        try:
            value = float(name[len("const"):])
        except ValueError:
            raise ValueError(f"bad constant schedule {name!r}; write e.g. 'const0.008'") from None
        return np.full(T, scale * value, dtype=np.float64)
    raise ValueError(f"unknown beta schedule {name!r}; use 'linear', 'cosine' or 'constX'")


def ddim_timesteps(steps: int, T: int = 1000) -> list[int]:
    """The original timesteps a ``steps``-step DDIM visits, ascending.

    Official rule: the smallest integer stride s with ``len(range(0, T, s)) == steps`` gives
    ``[0, s, 2s, ...]`` (20 -> 0..950 by 50, 250 -> 0..996 by 4). Some counts have no such stride
    (e.g. 150, 300, 400 for T=1000); the official code raises for them. We instead use the official
    evenly-rounded spacing (the DDPM respacing rule): ``round(k * (T-1)/(steps-1))`` for k < steps,
    which starts at 0 and ends at T-1.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    for stride in range(1, T):
        if len(range(0, T, stride)) == steps:
            return list(range(0, T, stride))
    if steps == T:
        return list(range(T))
    if steps == 1:
        return [0]
    frac = (T - 1) / (steps - 1)
    return sorted({round(k * frac) for k in range(steps)})


@dataclass(frozen=True)
class _Tables:
    """Per-respaced-step coefficients (float32) on one device."""

    timesteps: torch.Tensor  # [N] int64 original timesteps
    sqrt_recip: torch.Tensor  # sqrt(1/a)
    sqrt_recipm1: torch.Tensor  # sqrt(1/a - 1)
    sqrt_a: torch.Tensor  # sqrt(a), for v prediction
    sqrt_1m_a: torch.Tensor  # sqrt(1 - a)
    sqrt_prev: torch.Tensor  # sqrt(a_prev), a_prev = 1 at the first step
    sqrt_1m_prev: torch.Tensor
    sqrt_next: torch.Tensor  # sqrt(a_next), a_next = 0 at the last step
    sqrt_1m_next: torch.Tensor


class GaussianDiffusion:
    """One diffusion process (T steps, a beta schedule) and its DDIM respacings."""

    def __init__(self, cfg: DiffusionConfig):
        if cfg.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {cfg.prediction!r}; use one of {PREDICTIONS}")
        self.cfg = cfg
        self.T = cfg.T
        self.betas = beta_schedule(cfg.beta_schedule, cfg.T)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self._cache: dict[tuple[int, str], _Tables] = {}
        self._q_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- forward process and training -------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise. x0, noise: [B, ...]; t: [B] int64."""
        sqrt_a, sqrt_1m_a = self._q_tables(x0.device)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return sqrt_a[t].view(shape).to(x0.dtype) * x0 + sqrt_1m_a[t].view(shape).to(x0.dtype) * noise

    def _q_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._q_cache:
            ac = self.alphas_cumprod
            self._q_cache[key] = (
                torch.from_numpy(np.sqrt(ac)).float().to(device),
                torch.from_numpy(np.sqrt(1.0 - ac)).float().to(device),
            )
        return self._q_cache[key]

    def sample_t(
        self,
        batch: int,
        device: torch.device,
        generator: torch.Generator | None = None,
        high_fraction: float = 0.0,
        high_start: float = 0.5,
    ) -> torch.Tensor:
        """Timesteps [B] int64 in [0, T): uniform (official) when ``high_fraction`` is 0.

        Otherwise each example independently, with probability ``high_fraction``, draws t uniformly
        from [floor(high_start * T), T) instead: a mixture biased toward high t, where the decoder
        cannot denoise without z_sem (speeds up learning a semantic code in short runs).
        """
        t = torch.randint(0, self.T, (batch,), device=device, generator=generator)
        if high_fraction <= 0.0:
            return t
        if not 0.0 <= high_start < 1.0 or high_fraction > 1.0:
            raise ValueError(f"need 0 <= high_start < 1 and high_fraction <= 1, got {high_start}, {high_fraction}")
        low = int(math.floor(high_start * self.T))
        t_high = torch.randint(low, self.T, (batch,), device=device, generator=generator)
        pick = torch.rand(batch, device=device, generator=generator) < high_fraction
        return torch.where(pick, t_high, t)

    def training_loss(
        self, eps_fn: EpsFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, x0_weight_max: float = 0.0
    ) -> torch.Tensor:
        """Per-example loss [B]: mean over non-batch dims of (target - output)^2 (mse) or |.| (l1).

        The target is the noise (``prediction="eps"``, official) or v = sqrt(a_t) noise - sqrt(1-a_t) x0.
        ``x0_weight_max`` > 0 multiplies each example's loss by clamp(1/SNR(t), 1, x0_weight_max)
        (1/SNR = (1 - a_t) / a_t): plain eps loss where SNR >= 1, the x0 error (truncated) at high t,
        where only z_sem can tell the decoder what the image is. 0 = official (unweighted).
        """
        x_t = self.q_sample(x0, t, noise)
        target = noise.float()
        if self.cfg.prediction == "v":
            sqrt_a, sqrt_1m_a = self._q_tables(x0.device)
            shape = (-1,) + (1,) * (x0.dim() - 1)
            target = sqrt_a[t].view(shape) * noise.float() - sqrt_1m_a[t].view(shape) * x0.float()
        err = eps_fn(x_t, t).float() - target
        err = err.abs() if self.cfg.loss == "l1" else err.square()
        # a mean over the non-batch dims, not flatten(1): flattening a channels_last map copies it, and its
        # backward hands the output conv an NCHW gradient (oneDNN then reorders: 9 vs 2 ms at tiny32 b16)
        loss = err.mean(dim=tuple(range(1, err.dim())))
        if x0_weight_max > 0:
            ac = torch.from_numpy(self.alphas_cumprod).float().to(t.device)[t]
            loss = loss * ((1 - ac) / ac).clamp(1.0, max(1.0, x0_weight_max))
        return loss

    # ---- DDIM --------------------------------------------------------------------------------
    def tables(self, steps: int, device: torch.device | str) -> _Tables:
        key = (steps, str(device))
        if key not in self._cache:
            self._cache[key] = self._build_tables(steps, torch.device(device))
        return self._cache[key]

    def _build_tables(self, steps: int, device: torch.device) -> _Tables:
        ts = ddim_timesteps(steps, self.T)
        # respaced betas (float64), exactly as the official SpacedDiffusion derives them
        new_betas, last = [], 1.0
        for t in ts:
            new_betas.append(1 - self.alphas_cumprod[t] / last)
            last = self.alphas_cumprod[t]
        ac = np.cumprod(1.0 - np.array(new_betas))
        ac_prev = np.append(1.0, ac[:-1])
        ac_next = np.append(ac[1:], 0.0)

        def f32(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(a, dtype=np.float64)).float().to(device)

        prev32, next32 = f32(ac_prev), f32(ac_next)
        return _Tables(
            timesteps=torch.tensor(ts, dtype=torch.int64, device=device),
            sqrt_recip=f32(np.sqrt(1.0 / ac)),
            sqrt_recipm1=f32(np.sqrt(1.0 / ac - 1)),
            sqrt_a=f32(np.sqrt(ac)),
            sqrt_1m_a=f32(np.sqrt(1.0 - ac)),
            sqrt_prev=prev32.sqrt(),
            sqrt_1m_prev=(1 - prev32).sqrt(),
            sqrt_next=next32.sqrt(),
            sqrt_1m_next=(1 - next32).sqrt(),
        )

    def _x0_and_eps(
        self, eps: StepFn, x: torch.Tensor, tab: _Tables, i: int, clip: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = tab.timesteps[i].expand(x.shape[0])
        out = eps(x, t, i).float()
        if self.cfg.prediction == "v":
            x0 = tab.sqrt_a[i] * x - tab.sqrt_1m_a[i] * out
        else:
            x0 = tab.sqrt_recip[i] * x - tab.sqrt_recipm1[i] * out
        if clip:
            x0 = x0.clamp(-1, 1)
        # re-derive eps from the (clipped) x0 so the update stays on the DDIM trajectory
        eps = (tab.sqrt_recip[i] * x - x0) / tab.sqrt_recipm1[i]
        return x0, eps

    def ddim_sample_progressive(
        self, eps_fn: EpsFn, x_T: torch.Tensor, steps: int, clip: bool | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x_{t_{i-1}}, x0_hat) for i = N-1 .. 0 of a DDIM (eta = 0) run from x_T.

        x_T: [B, ...] treated as x at the last respaced step. The final yielded sample is x0_hat.
        """
        clip = self.cfg.clip_denoised if clip is None else clip
        tab = self.tables(steps, x_T.device)
        predict = step_fn(eps_fn, tab.timesteps)
        x = x_T.float()
        for i in reversed(range(len(tab.timesteps))):
            x0, eps = self._x0_and_eps(predict, x, tab, i, clip)
            x = x0 * tab.sqrt_prev[i] + tab.sqrt_1m_prev[i] * eps
            yield x, x0

    def ddim_sample(self, eps_fn: EpsFn, x_T: torch.Tensor, steps: int, clip: bool | None = None) -> torch.Tensor:
        """Deterministic DDIM from x_T [B, ...] to x_0 [B, ...] in ``steps`` network calls."""
        x = x_T
        for step, _ in self.ddim_sample_progressive(eps_fn, x_T, steps, clip):
            x = step
        return x

    def ddim_invert(self, eps_fn: EpsFn, x0: torch.Tensor, steps: int, clip: bool | None = None) -> torch.Tensor:
        """DDIM inversion (the stochastic encoder): x_0 [B, ...] -> x_T [B, ...].

        Runs the DDIM ODE forwards over the same respaced steps. As in the official code, the last
        step uses a_next = 0, so the result is exactly the final re-derived eps (not scaled by
        sqrt(a)); decoding then starts from it at the last respaced step.
        """
        clip = self.cfg.clip_denoised if clip is None else clip
        tab = self.tables(steps, x0.device)
        predict = step_fn(eps_fn, tab.timesteps)
        x = x0.float()
        for i in range(len(tab.timesteps)):
            x0_hat, eps = self._x0_and_eps(predict, x, tab, i, clip)
            x = x0_hat * tab.sqrt_next[i] + tab.sqrt_1m_next[i] * eps
        return x
