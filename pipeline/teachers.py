"""Teacher adapters: a dual teacher (HF CLIPModel) and a single teacher (HF BLIP-ITM).

Each adapter loads a local Hugging Face directory with plain `from_pretrained`
(safetensors only, no remote code, nothing downloaded) and exposes the few
calls the MCAD maths in `pipeline/signals.py` needs:

    dual = DualTeacher.load(dir)        v = dual.encode_images(imgs); t = dual.encode_texts(caps)
    single = SingleTeacher.load(dir)    h = single.encode_images(imgs)        # once per image
                                        f, m = single.match(h[idx], texts)    # any pairs
                                        f, m = single.match_tokens(h, single.tokenize(texts), image_index=idx)
                                        #   the same, each image's cross-attention keys/values once

On CUDA both run in bfloat16 (float16 where the device has no native
bfloat16), CLIP with PyTorch's SDPA attention (BLIP has no SDPA path in
transformers 5.24: it stays eager), and their image and pair micro-batches are
sized to the device's free memory (`size_micro_batches`); on the CPU they run
in float32 (shipped float16 weights are upcast there) with the pool's images
in one forward, as before. The dual logit scale is read in float32 whatever
the dtype. Outputs used as signals are float32 on the model's device;
gradients are never tracked.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from mcad.pipeline.itm import image_groups, itm_forward, itm_forward_cached, itm_logit
from mcad.pipeline.teacher_flops import CPU_BATCHES, DEVICE_SHARE, MicroBatches, size_micro_batches, working_set_bytes
from mcad.storage.errors import InputError, error_line
from mcad.storage.manifest import file_digest
from mcad.student.models import clip_image_embeddings, clip_text_embeddings

CONFIG_FILE = "config.json"
WEIGHTS_GLOB = "*.safetensors"


# ------------------------------------------------------------------ loading

def default_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, dtype: torch.dtype | None = None) -> torch.dtype:
    """`dtype` when given; else bfloat16 on CUDA devices with native bfloat16 (Ampere and later),
    float16 on older CUDA devices (emulated bfloat16 is slow), float32 on the CPU."""
    if dtype is not None:
        return dtype
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def attention_implementation(model_class) -> str:
    """"sdpa" (PyTorch's fused scaled-dot-product attention) where the transformers class has it,
    else "eager": CLIPModel has it; BlipForImageTextRetrieval does not in transformers 5.24
    (asking for it raises ValueError), so BLIP runs its own matmul-and-softmax attention."""
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def check_model_dir(path: str | Path, model_type: str, what: str) -> Path:
    """Refuse, with one line naming `what` ("dual teacher", "model"), a directory that is
    not a saved HF model of `model_type`."""
    p = Path(path)
    config = p / CONFIG_FILE
    if not config.is_file():
        raise InputError(f"{what} {str(p)!r}: not a Hugging Face model directory (no {CONFIG_FILE})")
    try:
        found = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise InputError(f"{what} {str(p)!r}: unreadable {CONFIG_FILE} ({exc})") from None
    if found != model_type:
        raise InputError(f"{what} {str(p)!r}: model_type is {found!r}, expected {model_type!r}")
    if not sorted(p.glob(WEIGHTS_GLOB)):
        raise InputError(f"{what} {str(p)!r}: no safetensors weights")
    return p


def _load(model_cls, path: Path, role: str, device: torch.device, dtype: torch.dtype):
    from safetensors import SafetensorError
    from transformers import AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # mcad shows its own bars; one per worker load is noise

    try:
        model, info = model_cls.from_pretrained(
            path, use_safetensors=True, local_files_only=True, trust_remote_code=False,
            dtype=dtype, attn_implementation=attention_implementation(model_cls), output_loading_info=True)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, SafetensorError) as exc:
        first = error_line(exc, first=True)
        raise InputError(f"{role} teacher {str(path)!r}: cannot load ({first})") from None
    _check_tokenizer(processor.tokenizer, model.config.text_config.vocab_size, path, role)
    # A checkpoint of the right family but another head (e.g. BLIP captioning)
    # would load with randomly initialised layers: refuse rather than score noise.
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise InputError(f"{role} teacher {str(path)!r}: weights missing for {len(missing)} "
                         f"tensors (e.g. {missing[0]}); is it a {model_cls.__name__}?")
    model.to(device).eval().requires_grad_(False)
    return model, processor


def _check_tokenizer(tokenizer, vocab_size: int, path: Path, role: str) -> None:
    # transformers quietly builds an empty tokenizer when the files are missing,
    # which would encode every caption as the same few ids.
    names = {"tokenizer.json", *getattr(type(tokenizer), "vocab_files_names", {}).values()}
    if not any((path / name).is_file() for name in names):
        raise InputError(f"{role} teacher {str(path)!r}: no tokenizer files (looked for {sorted(names)})")
    if len(tokenizer) > vocab_size:
        raise InputError(f"{role} teacher {str(path)!r}: tokenizer has {len(tokenizer)} tokens, "
                         f"the model only {vocab_size}")


def _weights_digest(files: Sequence[Path]) -> str:
    """One file: its own sha256. Sharded weights: sha256 over (name, digest) lines in name order."""
    if len(files) == 1:
        return file_digest(files[0])
    outer = hashlib.sha256()
    for f in files:
        outer.update(f"{f.name}\0{file_digest(f)}\n".encode())
    return outer.hexdigest()


def teacher_digests(path: str | Path) -> dict:
    """{"config_sha256", "weights_sha256"} of a teacher directory, read from its files
    without loading the model: what the manifest pins for each role."""
    path = Path(path)
    return {"config_sha256": file_digest(path / CONFIG_FILE),
            "weights_sha256": _weights_digest(sorted(path.glob(WEIGHTS_GLOB)))}


def _identity(path: Path, kind: str, model) -> dict:
    return {"kind": kind, "path": str(path.resolve()), "architecture": type(model).__name__,
            **teacher_digests(path)}


def _batched(n: int, size: int):
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))


def _file_tensor(path: Path | None, name: str) -> torch.Tensor | None:
    """Tensor `name` as stored in a teacher dir's safetensors files (None: no dir or no such tensor)."""
    from safetensors import safe_open

    for f in sorted(Path(path).glob(WEIGHTS_GLOB)) if path is not None else ():
        with safe_open(str(f), framework="pt") as st:
            if name in st.keys():
                return st.get_tensor(name)
    return None


class _Teacher:
    """Shared plumbing: the model, its processor, device and dtype."""

    kind = ""          # the config's model_type
    role = ""          # "dual" or "single", for messages
    model_class = ""   # the transformers class that loads it

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None):
        import transformers

        p = check_model_dir(path, cls.kind, f"{cls.role} teacher")
        dev = default_device(device)
        model, processor = _load(getattr(transformers, cls.model_class), p, cls.role, dev,
                                 default_dtype(dev, dtype))
        teacher = cls(model, processor, p)
        teacher.fit_to_device()
        return teacher

    def __init__(self, model, processor, path: Path):
        self.model = model
        self.processor = processor
        self.path = path
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.batches = CPU_BATCHES

    @property
    def attn_implementation(self) -> str:
        return str(self.model.config._attn_implementation)

    def fit_to_device(self, free_bytes: int | None = None, share: float = DEVICE_SHARE) -> MicroBatches:
        """Size the micro-batches to `share` of `free_bytes` (default: the CUDA device's free
        memory now; the CPU keeps CPU_BATCHES). Processes sharing one device (fractional GPUs
        per Ray worker) should pass a share scaled by their fraction."""
        if free_bytes is None and self.device.type == "cuda":
            free_bytes = torch.cuda.mem_get_info(self.device)[0]
        elt = torch.empty((), dtype=self.dtype).element_size()
        self.batches = size_micro_batches(free_bytes, share=share, **working_set_bytes(
            self.model.config, self.kind, elt, self.attn_implementation))
        return self.batches

    def _chunks(self, n: int) -> list[slice]:
        """Slices of `batches.images` items; one empty slice for n = 0 (the empty-input error stays)."""
        return list(_batched(n, self.batches.images or n)) or [slice(0, 0)]

    def identity(self) -> dict:
        """Path and content digests, for the manifest and for refusing mismatched stores."""
        return _identity(self.path, self.kind, self.model)

    def _pixels(self, images: Sequence) -> torch.Tensor:
        if not len(images):
            raise ValueError("no images to encode")
        px = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return px.to(self.device, self.dtype)

    def _tokens(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        if not len(texts):
            raise ValueError("no texts to encode")
        tok = self.processor.tokenizer(list(texts), padding=True, truncation=True,
                                       max_length=max_length, return_tensors="pt")
        return {k: tok[k].to(self.device) for k in ("input_ids", "attention_mask")}


# ------------------------------------------------------------- dual teacher

class DualTeacher(_Teacher):
    """A CLIP-like dual encoder: normalised image and text embeddings, its logit scale."""

    kind, role, model_class = "clip", "dual", "CLIPModel"

    def __init__(self, model, processor, path: Path):
        super().__init__(model, processor, path)
        # Loaded in bfloat16 the log scale would be rounded to 8 bits (CLIP's 4.6052 -> 4.59375:
        # s = 98.9 instead of 100); the value in the weights file is exact.
        stored = _file_tensor(path, "logit_scale") if self.dtype != torch.float32 else None
        log_scale = stored if stored is not None else model.logit_scale.detach()
        self._logit_scale = float(log_scale.float().exp())

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def logit_scale(self) -> float:
        """s = exp(the learnt log scale) in float32, as CLIPModel.forward computes it in float32."""
        return self._logit_scale

    @torch.no_grad()
    def encode_images(self, images: Sequence) -> torch.Tensor:
        """(n, D) float32, L2-normalised; `batches.images` at a time."""
        images = list(images)
        return torch.cat([clip_image_embeddings(self.model, self._pixels(images[sl]))
                          for sl in self._chunks(len(images))])

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, D) float32, L2-normalised; `batches.images` captions at a time."""
        texts, length = list(texts), self.model.config.text_config.max_position_embeddings
        parts = []
        for sl in self._chunks(len(texts)):
            tok = self._tokens(texts[sl], length)
            parts.append(clip_text_embeddings(self.model, tok["input_ids"], tok["attention_mask"]))
        return torch.cat(parts)


# ----------------------------------------------------------- single teacher

class SingleTeacher(_Teacher):
    """A BLIP-like fusion teacher: ITM logits and the fused [CLS] of image-text pairs.

    The image tower runs once per image (`encode_images`); `match` then scores
    any list of pairs from those states, which is how BlipForImageTextRetrieval
    computes `itm_score` with `use_itm_head=True`.
    """

    kind, role, model_class = "blip", "single", "BlipForImageTextRetrieval"

    @property
    def dim_fused(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @torch.no_grad()
    def encode_images(self, images: Sequence) -> torch.Tensor:
        """(n, L, H) vision last hidden states, in the model's dtype, on its device;
        `batches.images` at a time."""
        images = list(images)
        return torch.cat([self.model.vision_model(pixel_values=self._pixels(images[sl])).last_hidden_state
                          for sl in self._chunks(len(images))])

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (n, T), padded to the longest text."""
        return self._tokens(texts, self.model.config.text_config.max_position_embeddings)

    # Cross-attention keys and values of each image computed once and reused by all
    # its pairs (`itm_forward_cached`); False: projected again for every pair, as
    # BlipForImageTextRetrieval does (the bench's "uncached" side).
    cross_kv_cache = True

    @property
    def kv_cache_bytes(self) -> int:
        """Most bytes of projected keys and values held at once (one pair batch's images):
        1 GiB on the CPU, sized to the device on CUDA (`batches`)."""
        return self.batches.kv_cache_bytes

    def pair_batch(self, requested: int = 0) -> int:
        """Pairs per ITM forward: `requested` when positive, else the device's size
        (`batches.pairs`; 256 on the CPU, PassConfig's default)."""
        return requested if requested > 0 else (self.batches.pairs or 256)

    @torch.no_grad()
    def match_tokens(self, image_states: torch.Tensor, tokens: dict[str, torch.Tensor], *,
                     image_index: torch.Tensor | None = None, batch_size: int = 256,
                     progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Score pair r = (image_states[r], tokens[r]) for every r, or with `image_index`,
        r = (image_states[image_index[r]], tokens[r]): states once per image, any pairs of them.

        Returns fused (m, F) float32, the multimodal [CLS] state, and itm (m,)
        float32 = logit(match) - logit(no match) of the ITM head on it. With
        `image_index`, each image's cross-attention keys and values are projected
        once per pair batch and shared by its pairs (`cross_kv_cache`). Batches
        larger than the device's `batches.pairs` are split.
        """
        m = tokens["input_ids"].shape[0]
        if image_index is None and image_states.shape[0] != m:
            raise ValueError(f"{image_states.shape[0]} image states but {m} texts")
        if image_index is not None and image_index.shape[0] != m:
            raise ValueError(f"{image_index.shape[0]} image indices but {m} texts")
        fused, itm = [], []
        for sl in _batched(m, min(batch_size, self.batches.pairs or batch_size)):
            ids, mask = tokens["input_ids"][sl], tokens["attention_mask"][sl]
            if image_index is None:
                parts = [itm_forward(self.model, ids, mask, image_states[sl].to(self.device, self.dtype))]
            elif not self.cross_kv_cache:
                rows = image_index[sl].to(image_states.device)
                parts = [itm_forward(self.model, ids, mask, image_states[rows].to(self.device, self.dtype))]
            else:
                parts = [itm_forward_cached(self.model, ids[part], mask[part],
                                            image_states[uniq.to(image_states.device)].to(self.device, self.dtype),
                                            local.to(self.device))
                         for part, uniq, local in image_groups(image_index[sl], self._images_per_cache(image_states))]
            for cls_state, logits in parts:
                fused.append(cls_state.float())
                itm.append(itm_logit(logits))
            if progress is not None:
                progress(sl.stop - sl.start)
        return torch.cat(fused), torch.cat(itm)

    def _images_per_cache(self, image_states: torch.Tensor) -> int:
        """Images whose keys and values of every cross-attention layer fit kv_cache_bytes."""
        cfg = self.model.config.text_config
        per_image = (2 * cfg.num_hidden_layers * image_states.shape[1] * cfg.hidden_size
                     * torch.empty((), dtype=self.dtype).element_size())
        return max(1, self.kv_cache_bytes // per_image)

    def match(self, image_states: torch.Tensor, texts: Sequence[str], *,
              batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """fused (m, F) and itm (m,) for the pairs (image_states[r], texts[r])."""
        return self.match_tokens(image_states, self.tokenize(texts), batch_size=batch_size)


TEACHERS: dict[str, type[_Teacher]] = {"clip": DualTeacher, "blip": SingleTeacher}


def check_teacher_dirs(dual_path: str | Path, single_path: str | Path) -> None:
    """Refuse, before any work starts, directories that are not a CLIP and a BLIP-ITM."""
    for cls, path in ((DualTeacher, dual_path), (SingleTeacher, single_path)):
        check_model_dir(path, cls.kind, f"{cls.role} teacher")


def load_teachers(dual_path: str | Path, single_path: str | Path, *,
                  device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None,
                  device_share: float = DEVICE_SHARE) -> tuple[DualTeacher, SingleTeacher]:
    """Both teachers of a pass, on the same device, their micro-batches sized to `device_share`
    of the memory left free with both loaded."""
    dual = DualTeacher.load(dual_path, device=device, dtype=dtype)
    single = SingleTeacher.load(single_path, device=device, dtype=dtype)
    for teacher in (dual, single):
        teacher.fit_to_device(share=device_share)
    return dual, single
