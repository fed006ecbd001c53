"""DiffAE: the facade users touch — encode, invert, decode, sample, classify, manipulate, interpolate.

Images are [B, 3, H, W] float in [-1, 1] at ``config.image_size``; z_sem is [B, Z] (Z = 512 in all
presets); x_T has the image's shape. Every public inference call runs under ``torch.inference_mode``
with the networks in eval mode (the caller's train/eval state is restored afterwards), in float32
unless ``inference_dtype`` is set to torch.bfloat16 / torch.float16 (autocast).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .classifier import AttributeClassifier, resolve_attribute
from .config import ModelConfig, get_preset
from .diffusion import GaussianDiffusion
from .encoder import SemanticEncoder
from .latent import LatentMLP
from .unet import ConditionalUNet, ConditionedUNet
from .weights import ClassifierWeights, LatentWeights, ModelWeights, WeightsMismatch, load_checked

NO_LATENT_NET = (
    "this model has no latent DPM, so it cannot sample unconditionally: train one with "
    "`diffae train latent --bundle BUNDLE` (or load a bundle / official checkpoint that has one)"
)
NO_CLASSIFIER = (
    "this model has no attribute classifier: train one with `diffae train classifier --bundle BUNDLE` "
    "or pass classifier_ckpt=... to DiffAE.from_official"
)


AUTOENCODER_PARTS = ("encoder", "unet")
# _FORMATS: the file formats (bundle.py: safetensors + pyarrow storage; official_format.py) are imported
# inside the methods that read and write them, so that this module never imports them at load time: no
# import cycle, and the model itself needs nothing beyond torch and numpy (benchmarks/device_check.py).


class DiffAE(nn.Module):
    """A Diffusion Autoencoder: semantic encoder + conditional UNet (+ latent DPM, + classifier).

    ``parts`` chooses which of the autoencoder's networks exist (a serving replica that only encodes builds
    the encoder alone); a method that needs a missing network says so.
    """

    def __init__(self, config: ModelConfig, parts: Collection[str] = AUTOENCODER_PARTS):
        super().__init__()
        unknown = set(parts) - set(AUTOENCODER_PARTS)
        if unknown:
            raise ValueError(f"unknown part(s) {sorted(unknown)}; an autoencoder has {AUTOENCODER_PARTS}")
        self.config = config
        self.encoder = SemanticEncoder(config.unet, config.encoder) if "encoder" in parts else None
        self.unet = ConditionalUNet(config.unet) if "unet" in parts else None
        self.latent_net: LatentMLP | None = None
        self.register_buffer("latent_mean", None)
        self.register_buffer("latent_std", None)
        self.classifier: AttributeClassifier | None = None
        self.diffusion = GaussianDiffusion(config.diffusion)
        self.latent_diffusion = GaussianDiffusion(config.latent_diffusion)
        self.inference_dtype: torch.dtype | None = None
        self.eval()

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> DiffAE:
        """Architecture only, random init (the autoencoder; no latent net or classifier yet)."""
        return cls(get_preset(name))

    @classmethod
    def from_config(cls, config: ModelConfig) -> DiffAE:
        return cls(config)

    @classmethod
    def from_weights(cls, weights: ModelWeights, device: str | torch.device = "cpu") -> DiffAE:
        """The model the weights describe (the networks they hold); WeightsMismatch lists any key that does
        not fit ``weights.config``."""
        model = cls(weights.config, parts=[p for p in AUTOENCODER_PARTS if getattr(weights, p) is not None])
        for part in AUTOENCODER_PARTS:
            if getattr(weights, part) is not None:
                load_checked(getattr(model, part), getattr(weights, part), part)
        if weights.latent is not None:
            model.attach_latent(weights.latent.state, weights.latent.mean, weights.latent.std)
        if weights.classifier is not None:
            head = weights.classifier
            model.attach_classifier(head.weight, head.bias, head.z_mean, head.z_std, head.attributes)
        return model.to(device)

    def weights(self) -> ModelWeights:
        """This model's networks as tensors (detached), for :func:`diffae_core.bundle.write_bundle`."""
        def state(module: nn.Module | None) -> dict[str, torch.Tensor] | None:
            return None if module is None else {k: v.detach() for k, v in module.state_dict().items()}

        out = ModelWeights(self.config, encoder=state(self.encoder), unet=state(self.unet))
        if self.latent_net is not None:
            out.latent = LatentWeights(state(self.latent_net), self.latent_mean.detach(), self.latent_std.detach())
        if self.classifier is not None:
            head = self.classifier
            out.classifier = ClassifierWeights(head.linear.weight.detach(), head.linear.bias.detach(),
                                               head.z_mean.detach(), head.z_std.detach(), tuple(self.attributes))
        return out

    @classmethod
    def load(cls, uri: str | Path, device: str | torch.device = "cpu", endpoint: str | None = None,
             parts: Collection[str] | None = None) -> DiffAE:
        """Load a bundle directory (local path, file:// or s3:// URI; see ``diffae_core.bundle``).

        parts: None for everything the bundle holds, or a subset of ("encoder", "unet", "latent",
        "classifier") to read and build only those networks.
        """
        from .bundle import mismatch_error, read_bundle  # in the call: see _FORMATS

        weights = read_bundle(str(uri), endpoint, parts)
        try:
            return cls.from_weights(weights, device)
        except WeightsMismatch as exc:
            raise mismatch_error(str(uri), exc) from None

    def save(self, uri: str | Path, endpoint: str | None = None) -> None:
        """Write this model as a bundle (EMA/inference weights, config, manifest with sha256)."""
        from .bundle import write_bundle  # in the call: see _FORMATS

        write_bundle(str(uri), self.weights(), endpoint)

    @classmethod
    def from_official(
        cls,
        path: str | Path,
        classifier_ckpt: str | Path | None = None,
        latent_stats: str | Path | None = None,
        device: str | torch.device = "cpu",
        image_size: int | None = None,
    ) -> DiffAE:
        """Import official phizaz/diffae files (safe: no arbitrary unpickling). See ``official_format``.

        path: the autoencoder (or autoencoder + latent) ``last.ckpt``; classifier_ckpt: the classifier's
        ``last.ckpt``; latent_stats: ``latent.pkl``. The architecture is inferred from the weights;
        ``image_size`` is needed only for files without the ``x_T`` buffer.
        """
        from .official_format import mismatch_error, read_official  # in the call: see _FORMATS

        weights = read_official(path, classifier_ckpt=classifier_ckpt, latent_stats=latent_stats, image_size=image_size)
        try:
            return cls.from_weights(weights, device)
        except WeightsMismatch as exc:
            raise mismatch_error(path, exc) from None

    def attach_latent(
        self, net: LatentMLP | dict[str, torch.Tensor], mean: torch.Tensor, std: torch.Tensor
    ) -> None:
        """Add a latent DPM (module or state dict for ``config.latent``) and the z statistics [Z]."""
        if self.config.latent is None:
            raise ValueError("config.latent is None: set a LatentConfig before attaching a latent net")
        if isinstance(net, dict):
            module = LatentMLP(self.config.latent)
            load_checked(module, net, "latent")
            net = module
        device = self.device
        self.latent_net = net.to(device).eval()
        self.latent_mean = mean.detach().reshape(-1).float().to(device)
        self.latent_std = std.detach().reshape(-1).float().to(device)

    def attach_classifier(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        z_mean: torch.Tensor,
        z_std: torch.Tensor,
        attributes: Sequence[str],
    ) -> None:
        """Add a linear attribute head: weight [A, Z], bias [A], its own z statistics [Z], A names."""
        num_attrs, z_dim = weight.shape
        if len(attributes) != num_attrs:
            raise ValueError(f"{len(attributes)} attribute names for a {num_attrs}-output classifier")
        head = AttributeClassifier(z_dim, num_attrs)
        with torch.no_grad():
            head.linear.weight.copy_(weight)
            head.linear.bias.copy_(bias)
            head.z_mean.copy_(z_mean.reshape(-1))
            head.z_std.copy_(z_std.reshape(-1))
        self.classifier = head.to(self.device).eval()
        self.config.attributes = tuple(attributes)

    # ---- properties --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def attributes(self) -> list[str]:
        return list(self.config.attributes or [])

    # ---- raw network calls ---------------------------------------------------------------------
    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The decoder's raw output [B,3,H,W] for x_t [B,3,H,W], t [B] int64 ORIGINAL timesteps in [0,T),
        z [B,Z]: eps_hat, or v_hat when ``config.diffusion.prediction == "v"``."""
        unet = self._require("unet")
        with self._inference():
            x_t = self._check_images(x_t, "x_t").float()
            return unet(x_t, self._check_t(t, x_t.shape[0], self.diffusion.T), z.float()).float()

    def predict_latent_noise(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw latent-net call on NORMALISED z: z_t [B,Z], t [B] int64 original timesteps."""
        net = self._require_latent()
        with self._inference():
            return net(z_t.float(), self._check_t(t, z_t.shape[0], self.latent_diffusion.T)).float()

    # ---- autoencoding ----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z_sem [B, Z] for images x [B,3,H,W] in [-1,1]."""
        encoder = self._require("encoder")
        with self._inference():
            return encoder(self._check_images(x, "x").float()).float()

    def _eps_fn(self, z: torch.Tensor) -> ConditionedUNet:
        return ConditionedUNet(self._require("unet"), z)

    def encode_stochastic(self, x: torch.Tensor, z: torch.Tensor | None = None, steps: int = 20) -> torch.Tensor:
        """x_T [B,3,H,W] by DDIM inversion of x [B,3,H,W] in [-1,1] conditioned on z [B,Z] (None -> encode(x))."""
        if z is None:
            z = self.encode(x)
        with self._inference():
            x = self._check_images(x, "x").float()
            return self.diffusion.ddim_invert(self._eps_fn(z.float().to(self.device)), x, steps)

    def decode(self, x_T: torch.Tensor, z: torch.Tensor, steps: int = 20) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] by DDIM from x_T [B,3,H,W] conditioned on z_sem [B,Z]."""
        with self._inference():
            x_T = self._check_images(x_T, "x_T")
            return self.diffusion.ddim_sample(self._eps_fn(z.float().to(self.device)), x_T, steps)

    def reconstruct(self, x: torch.Tensor, steps: int = 20, inversion_steps: int | None = None) -> torch.Tensor:
        """encode -> invert -> decode: near-exact reconstruction of x [B,3,H,W] in [-1,1]."""
        z = self.encode(x)
        x_T = self.encode_stochastic(x, z, steps=inversion_steps or steps)
        return self.decode(x_T, z, steps=steps)

    # ---- unconditional sampling ----------------------------------------------------------------
    def sample_latent(
        self,
        n: int,
        latent_steps: int = 20,
        latent_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        clip_latent_noise: bool = False,
    ) -> torch.Tensor:
        """Raw z_sem [n, Z] from the latent DPM (DDIM without x0 clipping, then de-normalised)."""
        net = self._require_latent()
        with self._inference():
            z_dim = self.config.z_dim
            if latent_noise is None:
                latent_noise = self._randn((n, z_dim), generator)
            latent_noise = latent_noise.to(self.device, torch.float32)
            if latent_noise.shape != (n, z_dim):
                raise ValueError(f"latent_noise must be [{n}, {z_dim}], got {list(latent_noise.shape)}")
            if clip_latent_noise:
                latent_noise = latent_noise.clamp(-1, 1)
            z_n = self.latent_diffusion.ddim_sample(
                lambda z_t, t: net(z_t, t).float(), latent_noise, latent_steps, clip=False
            )
            return z_n * self.latent_std + self.latent_mean

    def sample(
        self,
        n: int,
        steps: int = 20,
        latent_steps: int = 20,
        noise: torch.Tensor | None = None,
        latent_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        clip_latent_noise: bool = False,
    ) -> torch.Tensor:
        """n unconditional images [n,3,H,W] in [-1,1]: latent DDIM -> z_sem -> image DDIM from noise.

        Pass ``noise`` [n,3,H,W] and ``latent_noise`` [n,Z] (or a ``generator``) for reproducibility.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        z = self.sample_latent(n, latent_steps, latent_noise, generator, clip_latent_noise)
        with self._inference():
            size = self.image_size
            if noise is None:  # drawn after the latent noise: the order sample_noise documents
                noise = self._randn((n, 3, size, size), generator)
            noise = noise.to(self.device, torch.float32)
            if noise.shape != (n, 3, size, size):
                raise ValueError(f"noise must be [{n}, 3, {size}, {size}], got {list(noise.shape)}")
        return self.decode(noise, z, steps=steps)

    def sample_noise(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent_noise [n,Z], noise [n,3,H,W]) drawn from ``generator`` in the order :meth:`sample` draws
        them, so that ``sample(n, latent_noise=ln, noise=x)`` with these equals ``sample(n, generator=g)``
        for a generator in the same state. Serving draws each request's noise with it."""
        size = self.image_size
        latent_noise = self._randn((n, self.config.z_dim), generator)
        return latent_noise, self._randn((n, 3, size, size), generator)

    # ---- attributes --------------------------------------------------------------------------
    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Attribute logits [B, A] for raw z_sem [B, Z] (names in ``self.attributes``)."""
        head = self._require_classifier()
        with self._inference():
            return head(z.float().to(self.device)).float()

    def manipulate(self, z: torch.Tensor, attribute: str | int, alpha: float | torch.Tensor) -> torch.Tensor:
        """z_sem moved along an attribute: normalise, step alpha*sqrt(Z) along the unit classifier row,
        de-normalise. z: [B, Z]; alpha: scalar or [B] (official range about +-0.5)."""
        head = self._require_classifier()
        index = resolve_attribute(self.attributes, attribute)
        alpha_t = torch.as_tensor(alpha, dtype=torch.float32)
        if not torch.isfinite(alpha_t).all():
            raise ValueError(f"alpha must be finite, got {alpha!r}")
        with self._inference():
            return head.manipulate(z.float().to(self.device), index, alpha_t.to(self.device))

    # ---- interpolation -----------------------------------------------------------------------
    def interpolate(
        self,
        x_a: torch.Tensor,
        x_b: torch.Tensor,
        n: int = 10,
        steps: int = 20,
        inversion_steps: int | None = None,
    ) -> torch.Tensor:
        """n images [n,3,H,W] in [-1,1] between x_a and x_b ([3,H,W] or [1,3,H,W] in [-1,1]).

        z_sem is interpolated linearly and x_T (from DDIM inversion) spherically, at alpha =
        linspace(0, 1, n).
        """
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"n must be an int >= 2, got {n!r}")
        pair = torch.cat([x_a.reshape(1, *x_a.shape[-3:]), x_b.reshape(1, *x_b.shape[-3:])])
        z = self.encode(pair)
        x_T = self.encode_stochastic(pair, z, steps=inversion_steps or steps)
        alpha = torch.linspace(0, 1, n, device=z.device)[:, None]
        z_i = (1 - alpha) * z[0] + alpha * z[1]
        x_T_i = slerp(x_T[0].flatten(), x_T[1].flatten(), alpha).reshape(n, *x_T.shape[1:])
        return self.decode(x_T_i, z_i, steps=steps)

    # ---- training ----------------------------------------------------------------------------
    def training_loss(
        self, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean MSE of the eps (or v) target over the batch for clean images x0 [B,3,H,W] in [-1,1] (gradients flow into
        encoder and UNet). t [B] int64 defaults to a draw from ``sample_t`` (uniform unless
        ``config.train.high_t_fraction`` > 0); noise to a standard normal draw. The loss is weighted
        toward high t when ``config.train.x0_weight_max`` > 0 (see ``GaussianDiffusion.training_loss``)."""
        if t is None:
            train = self.config.train
            t = self.diffusion.sample_t(x0.shape[0], x0.device, high_fraction=train.high_t_fraction,
                                        high_start=train.high_t_start)
        noise = torch.randn_like(x0) if noise is None else noise
        encoder, unet = self._require("encoder"), self._require("unet")
        z = encoder(x0)
        return self.diffusion.training_loss(lambda x_t, tt: unet(x_t, tt, z), x0, t, noise,
                                            x0_weight_max=self.config.train.x0_weight_max).mean()

    # ---- helpers -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = [m.training for m in self.modules()]
        self.eval()
        dtype = self.inference_dtype
        device_type = self.device.type
        try:
            with torch.inference_mode(), torch.autocast(device_type, dtype=dtype or torch.float32,
                                                         enabled=dtype is not None):
                yield
        finally:
            for m, mode in zip(self.modules(), was_training, strict=True):
                m.training = mode

    def _check_images(self, x: torch.Tensor, name: str) -> torch.Tensor:
        size = self.image_size
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (3, size, size):
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a [B, 3, {size}, {size}] tensor, got {shape}")
        return x.to(self.device)

    @staticmethod
    def _check_t(t: torch.Tensor, batch: int, T: int) -> torch.Tensor:
        if t.dtype not in (torch.int64, torch.int32) or t.shape != (batch,):
            raise ValueError(f"t must be an integer tensor of shape [{batch}], got {t.dtype} {list(t.shape)}")
        return t.long()

    def _randn(self, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
        device = generator.device if generator is not None else self.device
        return torch.randn(*shape, generator=generator, device=device)

    def _require(self, part: str) -> nn.Module:
        module = getattr(self, part)
        if module is None:
            raise RuntimeError(f"this model was built without its {part} (parts={AUTOENCODER_PARTS!r} "
                               f"are optional): load it with that part, e.g. DiffAE.load(uri)")
        return module

    def _require_latent(self) -> LatentMLP:
        if self.latent_net is None:
            raise RuntimeError(NO_LATENT_NET)
        return self.latent_net

    def _require_classifier(self) -> AttributeClassifier:
        if self.classifier is None:
            raise RuntimeError(NO_CLASSIFIER)
        return self.classifier


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of flat vectors a, b [D] at alpha [n, 1] -> [n, D] (lerp if parallel)."""
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).clamp(-1, 1)
    theta = torch.arccos(cos)
    if theta.abs() < 1e-6:
        return (1 - alpha) * a + alpha * b
    return (torch.sin((1 - alpha) * theta) * a + torch.sin(alpha * theta) * b) / torch.sin(theta)
