"""How fast does a Diff-AE learn a usable semantic code on ``shapes``? A curve per training recipe.

    python benchmarks/demo_recipe.py --recipe official|fast --budget-images N --eval-every M
                                     [--threads 1] [--eval-n 128] [--eval-steps 10] [--alpha 0.5]
                                     [--size 16] [--lr 1e-3] [--high-t-fraction 0.5] [--prediction v]
                                     ... (overrides)
    python benchmarks/demo_recipe.py --evaluate BUNDLE [BUNDLE ...]   (same evaluation, no training;
                                     reads samples_seen from BUNDLE/export.json when present)

Trains the autoencoder on rendered ``shapes`` (a fixed training set, fixed seeds) and, every M images
seen, evaluates on held-out images with the pixel oracle (``shapes_oracle``), never with the model's own
classifier:

- semantic reconstruction: z_sem of the input + a fresh random x_T, DDIM decode; the oracle's four
  attributes vs the input's (``sem`` = mean per-attribute agreement, ``sem4`` = all four right);
- manipulation: a logistic regression per attribute on normalised z_sem of training images, attached
  with ``DiffAE.attach_classifier``; each test image is moved toward the opposite value
  (``DiffAE.manipulate``, alpha signed by the current value) and decoded from its own DDIM-inverted x_T.
  ``flip`` = oracle attribute reached the target, ``kept`` = fraction of the other three attributes
  unchanged, ``ok`` = flipped with all others kept (with three others, >= 80% kept means all kept);
- stochastic reconstruction: DDIM inversion then decoding, PSNR in dB (images in [0, 1]).

Recipes: ``official`` is the tiny32 preset with the official optimiser (Adam 1e-4, no warm-up, EMA
0.9999, dropout 0.1, uniform t). ``fast`` is the ``demo16`` preset (see docs/demo-recipe.md). Every
recipe field can be overridden from the command line for ablations. The machine is shared, so wall
times are reported as measured with ``--threads`` intra-op threads; compare recipes by images seen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, setup_threads  # noqa: E402
from diffae_core import DiffAE  # noqa: E402
from diffae_core.config import ModelConfig, get_preset  # noqa: E402
from diffae_core.datasets import SHAPES_ATTRIBUTES, shapes_array, shapes_oracle  # noqa: E402
from diffae_core.ema import EMA  # noqa: E402

TEST_START = 1_000_000  # held-out indices: never in a training set
PROBE_START = 2_000_000  # images the manipulation classifier is fitted on (labels from the generator)


@dataclasses.dataclass
class Recipe:
    size: int
    model_channels: int
    channel_mult: tuple[int, ...]
    enc_channel_mult: tuple[int, ...]
    attention: tuple[int, ...]
    dropout: float
    batch: int
    lr: float
    warmup_steps: int
    ema_decay: float
    ema_warmup_steps: int
    high_t_fraction: float
    high_t_start: float
    x0_weight_max: float
    prediction: str  # "eps" (official) or "v"
    eval_weights: str  # "ema" or "online"


def recipe_from_config(cfg: ModelConfig, eval_weights: str = "ema") -> Recipe:
    u, tr = cfg.unet, cfg.train
    return Recipe(
        size=u.image_size, model_channels=u.model_channels, channel_mult=tuple(u.channel_mult),
        enc_channel_mult=tuple(cfg.encoder.channel_mult), attention=tuple(u.attention_resolutions),
        dropout=u.dropout, batch=tr.batch_size, lr=tr.lr, warmup_steps=tr.warmup_steps,
        ema_decay=tr.ema_decay, ema_warmup_steps=tr.ema_warmup_steps,
        high_t_fraction=getattr(tr, "high_t_fraction", 0.0), high_t_start=getattr(tr, "high_t_start", 0.5),
        x0_weight_max=getattr(tr, "x0_weight_max", 0.0), prediction=cfg.diffusion.prediction,
        eval_weights=eval_weights,
    )


def base_recipe(name: str) -> tuple[ModelConfig, Recipe]:
    if name == "official":
        # the official EMA (0.9999, no warm-up) is still ~95% random init after 500 steps: judge the
        # online weights, as the official recipe's baseline does
        cfg = get_preset("tiny32")
        return cfg, recipe_from_config(cfg, eval_weights="online")
    if name == "fast":
        cfg = get_preset("demo16")
        return cfg, recipe_from_config(cfg)
    raise SystemExit(f"unknown recipe {name!r}")


def build_config(base: ModelConfig, r: Recipe) -> ModelConfig:
    cfg = ModelConfig.from_dict(base.to_dict())
    cfg.unet = dataclasses.replace(cfg.unet, image_size=r.size, model_channels=r.model_channels,
                                   channel_mult=r.channel_mult, attention_resolutions=r.attention,
                                   dropout=r.dropout)
    cfg.encoder = dataclasses.replace(cfg.encoder, channel_mult=r.enc_channel_mult)
    cfg.diffusion = dataclasses.replace(cfg.diffusion, prediction=r.prediction)
    train = dict(batch_size=r.batch, lr=r.lr, warmup_steps=r.warmup_steps, ema_decay=r.ema_decay,
                 ema_warmup_steps=r.ema_warmup_steps, x0_weight_max=r.x0_weight_max)
    if r.high_t_fraction:
        train.update(high_t_fraction=r.high_t_fraction, high_t_start=r.high_t_start)
    cfg.train = dataclasses.replace(cfg.train, **train)
    return cfg


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def fit_classifier(model: DiffAE, probe_x: torch.Tensor, probe_y: np.ndarray) -> float:
    """Logistic regression per attribute on normalised z_sem; attaches it. Returns train accuracy."""
    from sklearn.linear_model import LogisticRegression

    z = torch.cat([model.encode(c) for c in probe_x.split(256)])
    mean, std = z.mean(0), z.std(0).clamp_min(1e-6)
    zn = ((z - mean) / std).numpy()
    weights, biases, accs = [], [], []
    for k in range(probe_y.shape[1]):
        clf = LogisticRegression(C=1.0, max_iter=2000).fit(zn, probe_y[:, k])
        weights.append(clf.coef_[0])
        biases.append(clf.intercept_[0])
        accs.append(clf.score(zn, probe_y[:, k]))
    model.attach_classifier(torch.tensor(np.stack(weights), dtype=torch.float32),
                            torch.tensor(biases, dtype=torch.float32), mean, std, SHAPES_ATTRIBUTES)
    return float(np.mean(accs))


@torch.no_grad()
def z_gap(model: DiffAE, x: torch.Tensor, t_lo: int = 300, t_hi: int = 700, seed: int = 99) -> float:
    """Relative eps-loss increase when z_sem is shuffled across the batch, t uniform in [t_lo, t_hi).

    0 = the decoder ignores z_sem. Cheap (one UNet call per image, no DDIM): the early signal that the
    semantic code is being used, before semantic reconstruction can move.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(t_lo, t_hi, (x.shape[0],), generator=g)
    noise = torch.randn(x.shape, generator=g)
    z = model.encode(x)
    perm = torch.roll(torch.arange(x.shape[0]), 1)
    true = model.diffusion.training_loss(lambda x_t, tt: model.predict_noise(x_t, tt, z), x, t, noise).mean()
    shuf = model.diffusion.training_loss(lambda x_t, tt: model.predict_noise(x_t, tt, z[perm]), x, t, noise).mean()
    return float((shuf - true) / true)


@torch.no_grad()
def evaluate(model: DiffAE, test_x: torch.Tensor, test_y: np.ndarray, probe_x: torch.Tensor,
             probe_y: np.ndarray, steps: int, alphas: list[float], seed: int = 1234) -> dict:
    g = torch.Generator().manual_seed(seed)
    z = model.encode(test_x)
    out: dict = {"zgap": z_gap(model, test_x)}
    # semantic reconstruction: fresh random x_T
    x_rand = torch.randn(test_x.shape, generator=g)
    sem = shapes_oracle(model.decode(x_rand, z, steps=steps).numpy())
    match = sem == test_y
    out["sem"] = float(match.mean())
    out["sem4"] = float(match.all(1).mean())
    out["sem_per_attr"] = match.mean(0).round(3).tolist()
    # stochastic reconstruction
    x_T = model.encode_stochastic(test_x, z, steps=steps)
    out["psnr"] = float(psnr(model.decode(x_T, z, steps=steps), test_x).mean())
    # manipulation toward the opposite value of each attribute
    out["probe_acc"] = fit_classifier(model, probe_x, probe_y)
    sign = torch.from_numpy(1 - 2 * test_y).float()  # attribute 0 -> +alpha, 1 -> -alpha
    out["manip"] = {}
    for alpha in alphas:
        per = {}
        for k, name in enumerate(SHAPES_ATTRIBUTES):
            z_m = model.manipulate(z, k, alpha * sign[:, k])
            got = shapes_oracle(model.decode(x_T, z_m, steps=steps).numpy())
            flip = got[:, k] == 1 - test_y[:, k]
            others = np.delete(got == test_y, k, axis=1)
            per[name] = {"flip": float(flip.mean()), "kept": float(others.mean()),
                         "ok": float((flip & others.all(1)).mean())}
        out["manip"][str(alpha)] = per
    return out


def lr_at(step: int, r: Recipe) -> float:
    if r.warmup_steps > 0:
        return r.lr * min(1.0, (step + 1) / r.warmup_steps)
    return r.lr


def print_row(res: dict) -> None:
    best = max(res["manip"], key=lambda a: np.mean([v["ok"] for v in res["manip"][a].values()]))
    cells = [f"{v['flip']:.2f}/{v['kept']:.2f}/{v['ok']:.2f}" for v in res["manip"][best].values()]
    print(" | ".join([str(res["images"]), f"{res['train_s']:.0f}", f"{res['img_s']:.1f}", f"{res['loss']:.4f}",
                      f"{res['sem']:.3f}", f"{res['sem4']:.3f}", f"{res['psnr']:.2f}", *cells])
          + f"   (alpha {best}, zgap {res['zgap']:.3f}, probe acc {res['probe_acc']:.3f}, "
          f"sem/attr {res['sem_per_attr']}, eval {res['eval_s']:.0f} s)", flush=True)


def evaluate_bundles(bundles: list[str], test_x: torch.Tensor, test_y: np.ndarray, probe_x: torch.Tensor,
                     probe_y: np.ndarray, args: argparse.Namespace) -> int:
    """Evaluate saved bundles (no training); rows as in a training curve, train columns from provenance."""
    curve = []
    for bundle in bundles:
        model = DiffAE.load(bundle)
        model.classifier = None
        start = time.perf_counter()
        res = evaluate(model, test_x, test_y, probe_x, probe_y, args.eval_steps, args.alpha)
        about_file = Path(bundle) / "export.json"
        about = json.loads(about_file.read_text()) if about_file.exists() else {}
        res.update(bundle=bundle, images=about.get("samples_seen", 0), train_s=0.0, img_s=0.0,
                   loss=float("nan"), eval_s=round(time.perf_counter() - start, 1))
        curve.append(res)
        print_row(res)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "curve": curve}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="fast", choices=["official", "fast"])
    p.add_argument("--budget-images", type=int, default=30_000)
    p.add_argument("--eval-every", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-n", type=int, default=20_000, help="size of the (cycled) training set")
    p.add_argument("--eval-n", type=int, default=128)
    p.add_argument("--probe-n", type=int, default=2000)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--alpha", type=float, nargs="+", default=[0.5])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", type=int, default=50, help="print the loss every N steps (0 = never)")
    p.add_argument("--json", help="also write the curve as JSON here")
    p.add_argument("--save", help="save the final model as a bundle here")
    p.add_argument("--evaluate", nargs="+", metavar="BUNDLE",
                   help="no training: evaluate these bundles (e.g. exported checkpoints of a pipeline run) the "
                        "same way and print one row each")
    for f in dataclasses.fields(Recipe):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("channel_mult", "enc_channel_mult", "attention"):
            p.add_argument(flag, type=int, nargs="*")
        elif f.name == "eval_weights":
            p.add_argument(flag, choices=["ema", "online"])
        elif f.name == "prediction":
            p.add_argument(flag, choices=["eps", "v"])
        else:
            p.add_argument(flag, type=int if f.type == "int" else float)
    args = p.parse_args(argv)
    threads = setup_threads(args.threads)
    base, recipe = base_recipe(args.recipe)
    for f in dataclasses.fields(Recipe):
        value = getattr(args, f.name)
        if value is not None:
            setattr(recipe, f.name, tuple(value) if isinstance(value, list) else value)
    cfg = build_config(base, recipe)
    print(f"# machine: {machine()}  threads={threads}")
    print(f"# recipe {args.recipe}: {json.dumps(dataclasses.asdict(recipe))}")

    t0 = time.perf_counter()
    train_np, _ = shapes_array(args.train_n, recipe.size, seed=0, start=0)
    train_x = to_tensor(train_np)
    test_np, test_y = shapes_array(args.eval_n, recipe.size, seed=0, start=TEST_START)
    test_x = to_tensor(test_np)
    probe_np, probe_y = shapes_array(args.probe_n, recipe.size, seed=0, start=PROBE_START)
    probe_x = to_tensor(probe_np)
    print(f"# data: {args.train_n} train / {args.eval_n} test / {args.probe_n} probe images rendered in "
          f"{time.perf_counter() - t0:.1f} s; eval with {args.eval_steps} DDIM steps, alpha {args.alpha}")

    if args.evaluate:
        return evaluate_bundles(args.evaluate, test_x, test_y, probe_x, probe_y, args)

    torch.manual_seed(args.seed)
    model = DiffAE.from_config(cfg).train()
    nparams = sum(p.numel() for p in model.parameters())
    print(f"# model: {nparams / 1e6:.2f}M parameters, {recipe.size} px")
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, foreach=True)
    ema = EMA(model, decay=recipe.ema_decay, warmup_steps=recipe.ema_warmup_steps)
    order_gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(args.train_n, generator=order_gen)
    cursor, seen, step, train_s = 0, 0, 0, 0.0
    curve, losses = [], []
    next_eval = args.eval_every
    header = ("images", "train_s", "img/s", "loss", "sem", "sem4", "psnr",
              *[f"{a}:flip/kept/ok" for a in SHAPES_ATTRIBUTES])
    print(" | ".join(header))
    while seen < args.budget_images:
        start = time.perf_counter()
        if cursor + recipe.batch > args.train_n:
            order, cursor = torch.randperm(args.train_n, generator=order_gen), 0
        x0 = train_x[order[cursor:cursor + recipe.batch]]
        cursor += recipe.batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        loss = model.training_loss(x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip, foreach=True)
        opt.step()
        ema.update()
        step += 1
        seen += recipe.batch
        losses.append(float(loss.detach()))
        train_s += time.perf_counter() - start
        if args.progress and step % args.progress == 0:
            print(f"#   step {step} images {seen} train {train_s:.0f} s ({seen / train_s:.1f} img/s) "
                  f"loss {np.mean(losses[-args.progress:]):.4f}", flush=True)
        if seen >= next_eval or seen >= args.budget_images:
            next_eval += args.eval_every
            net = ema.shadow if recipe.eval_weights == "ema" else model
            ev_start = time.perf_counter()
            res = evaluate(net, test_x, test_y, probe_x, probe_y, args.eval_steps, args.alpha)
            model.train()
            res.update(images=seen, steps=step, train_s=round(train_s, 1), img_s=round(seen / train_s, 1),
                       loss=float(np.mean(losses[-50:])), eval_s=round(time.perf_counter() - ev_start, 1))
            curve.append(res)
            print_row(res)
    if args.json:
        Path(args.json).write_text(json.dumps({"recipe": dataclasses.asdict(recipe), "threads": threads,
                                               "machine": machine(), "curve": curve}, indent=1))
    if args.save:
        net = ema.shadow if recipe.eval_weights == "ema" else model
        net.classifier = None
        net.save(args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
