"""Student dual encoders: size presets, the trainable `Student`, HF export and cost.

A student is a plain Hugging Face `CLIPModel` (what `mcad export` ships and any
CLIP code loads) plus two linear heads that map its embeddings into the
teacher's space for MCAD's feature loss; the heads are dropped at export.

    student, processor = build_student("s", tokenizer_from="teachers/dual", teacher_dim=128)
    u = student.encode_images(pixel_values)            # (B, d), L2-normalised
    w = student.encode_texts(input_ids, attention_mask)
    export_hf(student, processor, "out/student")       # CLIPModel.from_pretrained("out/student")

The vocabulary, maximum text length, special-token ids and image size come
from the tokenizer and image processor of a CLIP directory (the dual teacher
by default), so the student reads exactly the teacher's inputs.

Presets (`PRESETS`): smoke for tests, s the mobile-sized student, m a larger
one. Their parameters, FLOPs (`model_cost`) and speed against the demo
teachers are measured by `mcad bench presets`: see README, Results (the
presets table).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mcad.storage.atomic import atomic_write_json
from mcad.storage.errors import InputError, error_line

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100
# Beyond this a tokenizer's model_max_length is transformers' "unset" sentinel.
_SANE_MAX_LENGTH = 4096


@dataclass(frozen=True)
class ClipSize:
    """Shape of a CLIP-like model: a student preset, or a small teacher (pipeline/shapes/teacher_models).

    Vocabulary, text length and special tokens come from the tokenizer. The
    image side comes from the image processor; `image_size` is set only where
    the processor is built from the size (the small teachers), and must agree.
    """

    patch_size: int
    hidden: int
    intermediate: int
    vision_layers: int
    text_layers: int
    heads: int
    proj_dim: int  # d, the embedding dimension (CLIP projection_dim; a BLIP teacher's ITC space)
    image_size: int | None = None  # None: whatever the processor makes

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ClipSize] = {
    # Builds in well under a second: for tests.
    "smoke": ClipSize(patch_size=8, hidden=32, intermediate=64, vision_layers=1, text_layers=1,
                      heads=2, proj_dim=32),
    # About a quarter of the demo teacher's parameters and FLOPs: the "mobile" student.
    "s": ClipSize(patch_size=8, hidden=64, intermediate=256, vision_layers=3, text_layers=3,
                  heads=2, proj_dim=64),
    # About two thirds of the demo teacher, with a deeper image tower.
    "m": ClipSize(patch_size=8, hidden=96, intermediate=384, vision_layers=4, text_layers=3,
                  heads=4, proj_dim=96),
}


def resolve_size(size: str | ClipSize, registry: Mapping[str, ClipSize], what: str) -> ClipSize:
    """`size` itself, or its entry in `registry`; an unknown name is refused, naming `what` ("student")."""
    if isinstance(size, ClipSize):
        return size
    if size not in registry:
        raise InputError(f"unknown {what} size {size!r}; choose one of {sorted(registry)}")
    return registry[size]


def get_preset(preset: str | ClipSize) -> ClipSize:
    return resolve_size(preset, PRESETS, "student")


# ------------------------------------------------------------------ inputs

def load_processor(path: str | Path):
    """The CLIP processor (tokenizer + image processor) saved in a directory."""
    from transformers import AutoProcessor

    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{str(p)!r}: not a directory (expected a CLIP model or processor dir)")
    try:
        processor = AutoProcessor.from_pretrained(p, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        first = error_line(exc, first=True)
        raise InputError(f"{str(p)!r}: cannot load a processor ({first})") from None
    if not (hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")):
        raise InputError(f"{str(p)!r}: holds a {type(processor).__name__}, not a CLIP processor "
                         "(tokenizer + image processor)")
    return processor


def image_size(image_processor) -> int:
    """The side of the square pixel_values the processor produces."""
    cropped = getattr(image_processor, "do_center_crop", False)
    size = image_processor.crop_size if cropped else image_processor.size
    side = size.get("height") if size is not None else None
    if not side or side != size.get("width"):
        # e.g. a shortest-edge resize without a crop keeps the aspect ratio
        raise InputError(f"{type(image_processor).__name__} does not make square images of a fixed size "
                         f"({size}); a CLIP image processor crops or resizes to height = width")
    return int(side)


def text_length(tokenizer) -> int:
    n = int(tokenizer.model_max_length)
    if not 2 <= n <= _SANE_MAX_LENGTH:
        raise InputError(f"tokenizer model_max_length is {n}: set it to the text length the model takes")
    return n


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise InputError(f"tokenizer has no {', '.join(missing)}: a CLIP tokenizer needs bos, eos and pad")
    # With eos == 2, transformers pools CLIP text at argmax(input_ids), which is
    # the eos only for the original OpenAI vocabulary; tiny vocabularies keep eos off id 2.
    if ids["eos_token_id"] == 2:
        raise InputError("tokenizer eos id is 2; CLIP would pool at argmax(input_ids) instead of the eos")
    return ids


def clip_config(size: str | ClipSize, processor):
    """A CLIPConfig of the size's shape that reads `processor`'s inputs (students and the small dual teachers)."""
    from transformers import CLIPConfig

    s = get_preset(size)
    tok = processor.tokenizer
    text = dict(vocab_size=len(tok), hidden_size=s.hidden, intermediate_size=s.intermediate,
                num_hidden_layers=s.text_layers, num_attention_heads=s.heads,
                max_position_embeddings=text_length(tok), projection_dim=s.proj_dim, **_special_ids(tok))
    side = image_size(processor.image_processor)
    if s.image_size is not None and s.image_size != side:
        raise InputError(f"the size is for {s.image_size} px images, the processor makes {side} px")
    vision = dict(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.vision_layers,
                  num_attention_heads=s.heads, image_size=side, patch_size=s.patch_size, projection_dim=s.proj_dim)
    if vision["patch_size"] > vision["image_size"]:
        raise InputError(f"patch size {s.patch_size} is larger than the {vision['image_size']} px images")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=s.proj_dim)


# ------------------------------------------------------------- embeddings

def clip_image_embeddings(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, d) float32 L2-normalised image embeddings of any CLIPModel (student or dual teacher).

    Cast to float32 before normalising, so a float16 teacher's embeddings are
    normalised in float32 (a float32 model's are unchanged by the cast). Every
    CLIP encode in mcad goes through here or `clip_text_embeddings`.
    """
    return F.normalize(clip.get_image_features(pixel_values=pixel_values).pooler_output.float(), dim=-1)


def clip_text_embeddings(clip, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """(B, d) float32 L2-normalised text embeddings (pooled at each text's first eos)."""
    out = clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return F.normalize(out.pooler_output.float(), dim=-1)


# ------------------------------------------------------------------ model

class Student(nn.Module):
    """A CLIPModel plus linear heads d -> D into the teacher space (dropped at export)."""

    def __init__(self, clip, teacher_dim: int):
        super().__init__()
        self.clip = clip
        d = int(clip.config.projection_dim)
        self.head_image = nn.Linear(d, teacher_dim)
        self.head_text = nn.Linear(d, teacher_dim)

    @property
    def dim(self) -> int:
        return int(self.clip.config.projection_dim)

    @property
    def teacher_dim(self) -> int:
        return int(self.head_image.out_features)

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(learnt log scale), clamped at 100 as CLIP does; a scalar tensor with gradient."""
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, d) L2-normalised image embeddings."""
        return clip_image_embeddings(self.clip, pixel_values)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, d) L2-normalised text embeddings (pooled at each text's first eos)."""
        return clip_text_embeddings(self.clip, input_ids, attention_mask)

    def to_teacher(self, image: torch.Tensor | None = None,
                   text: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """h_v(u), h_t(w): the feature-distillation heads on normalised embeddings (not normalised)."""
        return (None if image is None else self.head_image(image),
                None if text is None else self.head_text(text))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """image, text (B, d) normalised; image_head, text_head (B, D); logit_scale (scalar)."""
        u, w = self.encode_images(pixel_values), self.encode_texts(input_ids, attention_mask)
        hu, hw = self.to_teacher(u, w)
        return {"image": u, "text": w, "image_head": hu, "text_head": hw, "logit_scale": self.logit_scale}


def build_student(preset: str | ClipSize | None, *, tokenizer_from: str | Path, teacher_dim: int,
                  init: str | Path | None = None, seed: int = 0) -> tuple[Student, object]:
    """(Student, processor): a preset with random weights, or `init` (any CLIPModel dir) when given.

    `tokenizer_from` is the CLIP dir whose tokenizer and image processor the
    student uses (the dual teacher by default). With `init`, pass preset=None.
    Weights are drawn from `seed` without touching torch's global RNG.
    """
    if teacher_dim < 1:
        raise InputError(f"teacher dimension must be positive, got {teacher_dim}")
    if (preset is None) == (init is None):
        raise InputError("give a student size preset or an init model dir (exactly one)")
    processor = load_processor(tokenizer_from)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = _load_init(init, processor) if init is not None else _new_clip(preset, processor)
        student = Student(clip, teacher_dim)
    return student, processor


def _new_clip(preset, processor):
    from transformers import CLIPModel

    return CLIPModel(clip_config(preset, processor))


def _load_init(init: str | Path, processor):
    """A CLIPModel from a dir, checked to read the processor's inputs the same way."""
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging

    p = Path(init)
    if not (p / "config.json").is_file():
        raise InputError(f"init {str(p)!r}: not a Hugging Face model directory (no config.json)")
    hf_logging.disable_progress_bar()
    try:
        clip = CLIPModel.from_pretrained(p, local_files_only=True, use_safetensors=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        first = error_line(exc, first=True)
        raise InputError(f"init {str(p)!r}: cannot load a CLIPModel ({first})") from None
    tc, vc, tok = clip.config.text_config, clip.config.vision_config, processor.tokenizer
    problems = []
    if len(tok) > tc.vocab_size:
        problems.append(f"tokenizer has {len(tok)} tokens, the model {tc.vocab_size}")
    if tc.eos_token_id != tok.eos_token_id:
        problems.append(f"model eos id {tc.eos_token_id} != tokenizer eos id {tok.eos_token_id}")
    if text_length(tok) > tc.max_position_embeddings:
        problems.append(f"tokenizer length {text_length(tok)} > model positions {tc.max_position_embeddings}")
    if image_size(processor.image_processor) != vc.image_size:
        problems.append(f"images are {image_size(processor.image_processor)} px, the model takes {vc.image_size}")
    if problems:
        raise InputError(f"init {str(p)!r} does not fit the tokenizer/processor: {'; '.join(problems)}")
    return clip


def export_hf(student: Student, processor, out_dir: str | Path, *, extra: dict | None = None) -> Path:
    """Save a standard HF CLIPModel dir (heads dropped) with its processor and tokenizer.

    `extra`, if given, is written as `mcad_student.json` beside (provenance: preset, run config).
    """
    from transformers.utils import logging as hf_logging

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-file bar is noise for a few-MB model
    try:
        student.clip.save_pretrained(out)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    processor.save_pretrained(out)
    if extra is not None:
        atomic_write_json(out / "mcad_student.json", json.loads(json.dumps(extra, default=str)))
    return out


# ------------------------------------------------------------------- cost

def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def model_cost(model, processor) -> dict:
    """Parameters (vision, text, total) and FLOPs per image and per caption of a CLIPModel.

    `model` is a CLIPModel or a Student (its heads, dropped at export, are not
    counted). FLOPs are torch's FlopCounterMode count (2 per multiply-add) for
    one image of the processor's size and one caption of the maximum length,
    with eager attention so the attention products count too.
    """
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    clip = model.clip if isinstance(model, Student) else model
    vision = _params(clip.vision_model) + _params(clip.visual_projection)
    text = _params(clip.text_model) + _params(clip.text_projection)
    # CPU attention kernels have no FLOP formula: measure a float32 eager copy.
    probe = copy.deepcopy(clip).float().cpu().eval()
    probe.set_attn_implementation("eager")
    side = image_size(processor.image_processor)
    length = min(text_length(processor.tokenizer), probe.config.text_config.max_position_embeddings)
    ids = torch.full((1, length), processor.tokenizer.bos_token_id, dtype=torch.long)
    ids[0, -1] = processor.tokenizer.eos_token_id
    with FlopCounterMode(display=False) as image_counter:
        probe.get_image_features(pixel_values=torch.zeros(1, 3, side, side))
    with FlopCounterMode(display=False) as text_counter:
        probe.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids))
    return {"params_vision": vision, "params_text": text, "params_total": _params(clip),
            "flops_per_image": int(image_counter.get_total_flops()),
            "flops_per_caption": int(text_counter.get_total_flops()),
            "image_size": side, "text_length": length}
