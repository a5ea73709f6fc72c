"""CLIP-family rewards: CLIPScore, PickScore, HPSv2 / HPSv2.1 and the LAION aesthetic predictor.

Each is an image-text (or image-only) embedding model plus a score formula, and the formulas differ in
scale — the reason published numbers disagree:

* CLIPScore (Hessel et al., arXiv:2104.08718, eq. 1): ``2.5 * max(cos, 0)``; ``mode="cosine"`` gives cos.
* PickScore (Kirstain et al., arXiv:2305.01569): ``logit_scale.exp() * cos`` (~100 cos), as its model card.
* HPSv2 / v2.1 (Wu et al., arXiv:2306.09341): raw cosine of the open_clip ViT-H-14 embeddings (~0.2-0.3).
* Aesthetic (LAION improved-aesthetic-predictor, as DDPO uses it): an MLP on the L2-normalised CLIP
  ViT-L/14 image embedding (~1-10); the prompt is ignored.

Embeddings come from the libraries' own modules (transformers ``CLIPModel``, ``open_clip``); the image
preprocessing is re-done in torch (``rewards.preprocess``) with the official geometry, so gradients
reach the pixels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rewards import preprocess
from rewards.base import Reward, RewardInfo, RewardOutput
from rewards.checkpoints import load_pretrained, load_state_dict, resolve_file
from rewards.errors import CheckpointNotFoundError, RewardInputError

CLIP_MAX_TOKENS = 77


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _embed_unique(embed, prompts: list[str]) -> torch.Tensor:
    """Embed each distinct prompt once (G samples of one prompt share one text pass)."""
    unique = list(dict.fromkeys(prompts))
    if len(unique) == len(prompts):
        return embed(prompts)
    embeddings = embed(unique)
    position = {prompt: i for i, prompt in enumerate(unique)}
    return embeddings[torch.tensor([position[p] for p in prompts], device=embeddings.device)]


def _place(module: nn.Module, device: str | torch.device, dtype: str | torch.dtype) -> nn.Module:
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


class HFCLIPEncoder(nn.Module):
    """Normalised image/text embeddings of a transformers ``CLIPModel`` with torch preprocessing that
    follows its ``CLIPImageProcessor`` (shortest side, centre crop with transformers' floor offsets)."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, *, size: int, crop: int, mean, std, resample: int = 3
    ):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.size, self.crop, self.mean, self.std = size, crop, tuple(mean), tuple(std)
        self.mode = {2: "bilinear", 3: "bicubic"}.get(int(resample), "bicubic")

    @classmethod
    def load(
        cls,
        pretrained: str | None,
        *,
        default_id: str,
        processor: str | None = None,
        what: str,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        with_text: bool = True,
    ) -> HFCLIPEncoder:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        # The whole CLIPModel even for image-only rewards: CLIPVisionModelWithProjection.from_pretrained on a
        # CLIPModel checkpoint silently re-initialises the projection when projection_dim is not 512.
        model = load_pretrained(CLIPModel.from_pretrained, pretrained, default_id=default_id, what=what)
        processor_source = processor if processor is not None else pretrained
        default_processor = default_id if processor is None else processor
        image_processor = load_pretrained(
            AutoImageProcessor.from_pretrained,
            processor_source,
            default_id=default_processor,
            what=f"{what} image processor",
        )
        tokenizer = (
            None
            if not with_text
            else load_pretrained(
                AutoTokenizer.from_pretrained,
                processor_source,
                default_id=default_processor,
                what=f"{what} tokenizer",
            )
        )
        size = image_processor.size.get("shortest_edge") or image_processor.size.get("height")
        crop = (
            image_processor.crop_size["height"] if getattr(image_processor, "do_center_crop", True) else size
        )
        encoder = cls(
            model,
            tokenizer,
            size=int(size),
            crop=int(crop),
            mean=image_processor.image_mean,
            std=image_processor.image_std,
            resample=getattr(image_processor, "resample", 3),
        )
        return _place(encoder, device, dtype)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = preprocess.resize(
            pixels.float(), preprocess.shortest_side_size(*pixels.shape[-2:], self.size), mode=self.mode
        )
        pixels = preprocess.center_crop(pixels, (self.crop, self.crop), offsets="floor")
        return preprocess.normalize(pixels, self.mean, self.std)

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        features = self.model.get_image_features(pixel_values=self.preprocess(pixels).to(dtype))
        return _l2(getattr(features, "pooler_output", features).float())  # transformers 5: an output object

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        return _embed_unique(self._embed_texts, prompts)

    def _embed_texts(self, prompts: list[str]) -> torch.Tensor:
        max_length = min(CLIP_MAX_TOKENS, self.tokenizer.model_max_length)  # tiny CLIPs have shorter contexts
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        tokens = {k: v.to(self.model.device) for k, v in tokens.items()}
        features = self.model.get_text_features(**tokens)
        return _l2(getattr(features, "pooler_output", features).float())

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().float()


class OpenCLIPEncoder(nn.Module):
    """Normalised embeddings of an ``open_clip`` model, preprocessing as its ``preprocess_cfg`` says:
    ``shortest`` (resize + centre crop, torchvision's rounding) or ``longest`` (resize + zero pad, HPSv2)."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, *, size: int, mean, std, resize_mode: str = "shortest"
    ):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.size, self.mean, self.std, self.resize_mode = size, tuple(mean), tuple(std), resize_mode

    @classmethod
    def load(
        cls,
        model_name: str,
        *,
        pretrained: str | None = None,
        state_dict_file: str | None = None,
        resize_mode: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        what: str,
    ) -> OpenCLIPEncoder:
        import open_clip

        if model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
            raise RewardInputError(
                f"{what}: unknown open_clip model {model_name!r}; see open_clip.list_models()"
            )
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained)
        except (RuntimeError, OSError) as error:
            raise CheckpointNotFoundError(
                f"{what}: open_clip could not load weights {pretrained!r} for {model_name}: {error}. Pass a local "
                "checkpoint file as pretrained=/path/to/open_clip_weights.bin"
            ) from error
        if state_dict_file is not None:
            model.load_state_dict(load_state_dict(state_dict_file, key="state_dict"))
        cfg = model.visual.preprocess_cfg
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        encoder = cls(
            model,
            open_clip.get_tokenizer(model_name),
            size=int(size),
            mean=cfg["mean"],
            std=cfg["std"],
            resize_mode=resize_mode or cfg.get("resize_mode", "shortest"),
        )
        return _place(encoder, device, dtype)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.float()
        if self.resize_mode == "longest":
            pixels = preprocess.resize_longest_side_and_pad(pixels, self.size)
        else:
            pixels = preprocess.center_crop(
                preprocess.resize_shortest_side(pixels, self.size), (self.size, self.size)
            )
        return preprocess.normalize(pixels, self.mean, self.std)

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return _l2(self.model.encode_image(self.preprocess(pixels).to(dtype)).float())

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        return _embed_unique(self._embed_texts, prompts)

    def _embed_texts(self, prompts: list[str]) -> torch.Tensor:
        return _l2(
            self.model.encode_text(self.tokenizer(prompts).to(next(self.model.parameters()).device)).float()
        )

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().float()


class CLIPScore(Reward):
    """CLIPScore: ``2.5 * max(cos, 0)`` (Hessel's, ``mode="hessel"``) or the raw cosine (``mode="cosine"``)."""

    HESSEL_WEIGHT = 2.5  # w in Hessel et al. eq. 1, chosen there to spread scores over ~[0, 1]

    def __init__(self, encoder: nn.Module, *, mode: str = "hessel", info: RewardInfo):
        super().__init__()
        if mode not in ("hessel", "cosine"):
            raise RewardInputError(f"clipscore mode must be 'hessel' or 'cosine', got {mode!r}")
        self.encoder, self.mode, self.info = encoder, mode, info

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        cosine = (self.encoder.embed_images(pixels) * self.encoder.embed_texts(prompts)).sum(-1)
        return RewardOutput(self.HESSEL_WEIGHT * cosine.clamp(min=0) if self.mode == "hessel" else cosine)


class PickScore(Reward):
    """``logit_scale.exp() * cos(image, text)`` of the PickScore CLIP-H model (as its model card)."""

    def __init__(self, encoder: nn.Module, *, info: RewardInfo):
        super().__init__()
        self.encoder, self.info = encoder, info

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        cosine = (self.encoder.embed_images(pixels) * self.encoder.embed_texts(prompts)).sum(-1)
        return RewardOutput(self.encoder.logit_scale * cosine)


class HPSv2(Reward):
    """Human Preference Score v2 / v2.1: the raw cosine of HPS-tuned open_clip ViT-H-14 embeddings."""

    def __init__(self, encoder: nn.Module, *, info: RewardInfo):
        super().__init__()
        self.encoder, self.info = encoder, info

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        return RewardOutput((self.encoder.embed_images(pixels) * self.encoder.embed_texts(prompts)).sum(-1))


class AestheticMLP(nn.Module):
    """LAION's improved aesthetic predictor head. Its layers are all linear (the dropouts do nothing at
    eval), kept as a Sequential so the checkpoint's ``layers.{0,2,4,6,7}`` keys load as they are."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


class Aesthetic(Reward):
    """LAION aesthetic score (~1-10) of the CLIP ViT-L/14 image embedding; ignores the prompt."""

    def __init__(self, encoder: nn.Module, head: AestheticMLP, *, info: RewardInfo):
        super().__init__()
        self.encoder, self.head, self.info = encoder, head, info

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        embeddings = self.encoder.embed_images(pixels)
        return RewardOutput(self.head(embeddings.to(next(self.head.parameters()).dtype)).float())


# ----------------------------------------------------------------------------- loaders (registered by name)
CLIPSCORE_INFO = RewardInfo(
    name="clipscore",
    description="CLIPScore (Hessel et al. 2021): image-text CLIP cosine",
    differentiable=True,
    modality="image",
    scale="2.5 * max(cos, 0) (mode='hessel'); cos (mode='cosine')",
    typical_range=(0.0, 1.0),
    default_checkpoint="openai/clip-vit-base-patch32",
)
PICKSCORE_INFO = RewardInfo(
    name="pickscore",
    description="PickScore (Kirstain et al. 2023): CLIP-H fine-tuned on Pick-a-Pic preferences",
    differentiable=True,
    modality="image",
    scale="logit_scale * cos (~100 cos)",
    typical_range=(15.0, 25.0),
    default_checkpoint="yuvalkirstain/PickScore_v1 (+ processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
)
HPS_INFO = {
    version: RewardInfo(
        name=f"hpsv{version}",
        description=f"Human Preference Score v{version} (Wu et al. 2023), open_clip ViT-H-14",
        differentiable=True,
        modality="image",
        scale="raw cosine",
        typical_range=(0.2, 0.35),
        default_checkpoint=f"xswu/HPSv2/{file}",
    )
    for version, file in (("2", "HPS_v2_compressed.pt"), ("2.1", "HPS_v2.1_compressed.pt"))
}
AESTHETIC_INFO = RewardInfo(
    name="aesthetic",
    description="LAION improved aesthetic predictor on CLIP ViT-L/14 (as DDPO)",
    differentiable=True,
    modality="image",
    scale="MLP on the L2-normalised image embedding (~1-10)",
    typical_range=(4.0, 7.0),
    needs_prompt=False,
    default_checkpoint="openai/clip-vit-large-patch14 + trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth",
)


def load_clipscore(
    *,
    pretrained: str | None = None,
    mode: str = "hessel",
    backend: str = "transformers",
    model_name: str = "ViT-B-32",
    device: str = "cpu",
    dtype: str = "float32",
) -> CLIPScore:
    """``backend="transformers"``: a CLIPModel (hub id or folder, default openai/clip-vit-base-patch32).
    ``backend="open_clip"``: ``model_name`` with open_clip ``pretrained`` (a tag such as "openai" or a file)."""
    if backend == "transformers":
        encoder = HFCLIPEncoder.load(
            pretrained,
            default_id="openai/clip-vit-base-patch32",
            what="clipscore",
            device=device,
            dtype=dtype,
        )
    elif backend == "open_clip":
        encoder = OpenCLIPEncoder.load(
            model_name, pretrained=pretrained or "openai", what="clipscore", device=device, dtype=dtype
        )
    else:
        raise RewardInputError(f"clipscore backend must be 'transformers' or 'open_clip', got {backend!r}")
    return CLIPScore(encoder, mode=mode, info=CLIPSCORE_INFO)


def load_pickscore(
    *,
    pretrained: str | None = None,
    processor: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> PickScore:
    """PickScore_v1; its processor (tokenizer and image settings) is CLIP-H's, from ``processor`` or,
    for a local ``pretrained`` folder, from that folder."""
    if processor is None and pretrained is None:
        processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    encoder = HFCLIPEncoder.load(
        pretrained,
        default_id="yuvalkirstain/PickScore_v1",
        processor=processor,
        what="pickscore",
        device=device,
        dtype=dtype,
    )
    return PickScore(encoder, info=PICKSCORE_INFO)


def load_hps(version: str):
    filename = {"2": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}[version]

    def load(
        *,
        pretrained: str | None = None,
        model_name: str = "ViT-H-14",
        device: str = "cpu",
        dtype: str = "float32",
    ) -> HPSv2:
        """The HPS checkpoint (a file, or the hub's xswu/HPSv2) on open_clip's ``model_name`` architecture."""
        path = resolve_file(pretrained, repo_id="xswu/HPSv2", filename=filename, what=f"hpsv{version}")
        encoder = OpenCLIPEncoder.load(
            model_name,
            state_dict_file=path,
            resize_mode="longest",
            what=f"hpsv{version}",
            device=device,
            dtype=dtype,
        )
        return HPSv2(encoder, info=HPS_INFO[version])

    return load


def load_aesthetic(
    *, pretrained: str | None = None, head: str | None = None, device: str = "cpu", dtype: str = "float32"
) -> Aesthetic:
    """CLIP ViT-L/14 (``pretrained``: hub id or folder) and the MLP head (``head``: a .pth/.safetensors
    file, default trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth)."""
    encoder = HFCLIPEncoder.load(
        pretrained,
        default_id="openai/clip-vit-large-patch14",
        what="aesthetic",
        device=device,
        dtype=dtype,
        with_text=False,
    )
    path = resolve_file(
        head,
        repo_id="trl-lib/ddpo-aesthetic-predictor",
        filename="aesthetic-model.pth",
        what="aesthetic head",
    )
    state = load_state_dict(path)
    mlp = AestheticMLP(dim=int(state["layers.0.weight"].shape[1]))
    mlp.load_state_dict(state)
    return Aesthetic(encoder, _place(mlp, device, dtype), info=AESTHETIC_INFO)
