"""Chat content parts → template-ready text with placeholder tokens + the raw items for each plugin.

Which part type feeds which plugin comes from what each plugin declares (its ``modality`` and
``placeholder`` in ``plugin.json``; the engine's :mod:`~autoglm_train.engine.routing`), not from a
fixed list; the wire names of the modalities live here:

* ``image`` plugins take OpenAI's ``image_url`` parts, which must carry ``data:`` URLs (base64):
  the server never fetches http(s) URLs;
* ``audio`` plugins take OpenAI's ``input_audio`` parts (base64 WAV);
* any other modality ``m`` takes ``{"type": "input_m", "input_m": {"data": <JSON value>}}``, an
  OpenAI-style extension; ``data`` goes to the plugin's ``preprocess`` as one item.

Each part becomes ``num_tokens`` copies of its plugin's placeholder token at its place in the text
(joined as :func:`~autoglm_train.model.prompt_format.join_content` joins a training example).
Every failure is an :class:`APIError` 400 naming the part (``messages[i].content[j]``).
Pillow decodes images and ``soundfile`` (libsndfile) decodes WAV audio; the checks and messages are ours.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoglm_train.engine.routing import PluginSlot
from autoglm_train.model.prompt_format import join_content
from autoglm_train.serve.errors import APIError
from autoglm_train.serve.schemas import AudioPart, ChatMessage, ImagePart, OtherPart, TextPart

# OpenAI's own part types for the modalities it names; every other modality m is "input_m".
OPENAI_PARTS = {"image": "image_url", "audio": "input_audio"}


def part_type(modality: str) -> str:
    """The content part type a client uses to send media of ``modality``."""
    return OPENAI_PARTS.get(modality, f"input_{modality}")


def part_slots(slots: dict[str, PluginSlot]) -> dict[str, PluginSlot]:
    """The engine's modality → plugin slots keyed by the content part type that carries each modality."""
    return {part_type(modality): slot for modality, slot in slots.items()}


@dataclass
class ParsedChat:
    messages: list[dict[str, Any]]
    """Messages with string content, placeholders in place of media parts."""
    items: dict[str, list[Any]] = field(default_factory=dict)
    """Plugin name → decoded items, in order of appearance."""


def parse_messages(
    messages: list[ChatMessage],
    slots: dict[str, PluginSlot],
    reserved: set[str],
    max_image_pixels: int,
) -> ParsedChat:
    """Flatten every message's content, decoding media parts for their plugins.

    Args:
        messages: validated chat messages.
        slots: content part type (``image_url``, ``input_audio``) → the bundle's plugin for it.
        reserved: placeholder strings a client may not type into text.
        max_image_pixels: larger images are refused before decoding.
    """
    parsed = ParsedChat(messages=[])
    for i, message in enumerate(messages):
        where = f"messages[{i}].content"
        if message.content is None or isinstance(message.content, str):
            text = message.content or ""
            check_reserved(text, reserved, where)
        else:
            pieces = []
            for j, part in enumerate(message.content):
                pieces.append(_part_text(part, f"{where}[{j}]", slots, reserved, parsed, max_image_pixels))
            text = join_content(pieces)
        # "developer" is OpenAI's newer name for "system"; chat templates only know the latter
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": text}
        if message.name:
            entry["name"] = message.name
        parsed.messages.append(entry)
    return parsed


def _part_text(
    part: Any, where: str, slots: dict[str, PluginSlot], reserved: set[str], parsed: ParsedChat, max_pixels: int
) -> str:
    if isinstance(part, TextPart):
        check_reserved(part.text, reserved, f"{where}.text")
        return part.text
    kind = part.type
    slot = slots.get(kind)
    if slot is None:
        have = ", ".join(f"{t} ({s.name} plugin, {s.modality})" for t, s in slots.items())
        if isinstance(part, OtherPart) and not kind.startswith("input_"):
            raise APIError(
                400,
                f"content part type '{kind}' is not supported; supported types: text" + (f", {have}" if have else ""),
                param=f"{where}.type",
                code="unsupported_content_type",
            )
        modality = {v: k for k, v in OPENAI_PARTS.items()}.get(kind, kind.removeprefix("input_"))
        raise APIError(
            400,
            f"this model has no {modality} plugin, so '{kind}' content cannot be used "
            f"(modality '{modality}' missing from the bundle; plugins: {have or 'none'})",
            param=f"{where}.type",
            code="unsupported_modality",
        )
    if parsed.items.get(slot.name):
        raise APIError(
            400,
            f"at most one {slot.modality} per request: the {slot.name} plugin fuses one item per sequence",
            param=where,
            code="too_many_items",
        )
    if isinstance(part, ImagePart):
        item = decode_image(part.image_url.url, f"{where}.image_url.url", max_pixels)
    elif isinstance(part, AudioPart):
        item = decode_audio(part.input_audio.data, part.input_audio.format, f"{where}.input_audio")
    else:
        item = decode_generic(part, where)
    parsed.items.setdefault(slot.name, []).append(item)
    return slot.placeholder * slot.num_tokens


def decode_generic(part: OtherPart, where: str) -> Any:
    """``{"type": "input_m", "input_m": {"data": ...}}`` → the ``data`` value, handed to the plugin as one item."""
    payload = (part.model_extra or {}).get(part.type)
    if not isinstance(payload, dict) or "data" not in payload:
        raise APIError(
            400,
            f'a \'{part.type}\' part carries its item as {{"{part.type}": {{"data": ...}}}}',
            param=f"{where}.{part.type}",
            code="invalid_media",
        )
    return payload["data"]


def check_reserved(text: str, reserved: set[str], where: str) -> None:
    for token in reserved:
        if token in text:
            raise APIError(
                400,
                f"text contains the reserved placeholder token {token!r}; send media as content parts instead",
                param=where,
                code="reserved_token",
            )


def decode_base64(data: str, where: str, what: str) -> tuple[bytes, str | None]:
    """``data:<mime>;base64,<b64>`` or bare base64 → (bytes, mime or None)."""
    mime = None
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or not header.endswith(";base64"):
            raise APIError(
                400, f"{what}: a data URL must be 'data:<type>;base64,<data>'", param=where, code=f"invalid_{what}"
            )
        mime = header[5:-7] or None
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(400, f"{what}: invalid base64 ({err})", param=where, code=f"invalid_{what}") from err
    if not raw:
        raise APIError(400, f"{what}: empty data", param=where, code=f"invalid_{what}")
    return raw, mime


def decode_image(url: str, where: str, max_pixels: int):
    """A ``data:image/...;base64,`` URL → an RGB ``PIL.Image``; http(s) and other URLs are refused."""
    if url.startswith(("http://", "https://")):
        raise APIError(
            400,
            "image_url: http(s) URLs are not fetched by this server (it runs offline); "
            "send the image inline as 'data:image/png;base64,<data>'",
            param=where,
            code="unsupported_image_url",
        )
    if not url.startswith("data:"):
        raise APIError(400, "image_url: expected a 'data:image/...;base64,' URL", param=where, code="invalid_image")
    raw, mime = decode_base64(url, where, "image")
    if mime and not mime.startswith("image/"):
        raise APIError(400, f"image_url: data URL type {mime!r} is not an image", param=where, code="invalid_image")
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if width * height > max_pixels:
            raise APIError(
                400,
                f"image is {width}x{height}, over the {max_pixels:,}-pixel limit",
                param=where,
                code="image_too_large",
            )
        image.load()
        return image.convert("RGB")
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise APIError(400, f"image: cannot decode it ({err})", param=where, code="invalid_image") from err


def decode_audio(data: str, fmt: str, where: str) -> tuple[np.ndarray, int]:
    """Base64 WAV → ``(mono float32 waveform in [-1, 1], sampling rate)``, decoded by ``soundfile`` (libsndfile).

    Any WAV that libsndfile reads is accepted (8/16/24/32-bit PCM, float); channels are averaged.
    Other containers are refused even when libsndfile could read them: the part says ``format: wav``.
    """
    if fmt.lower() != "wav":
        raise APIError(
            400,
            f"input_audio: format {fmt!r} is not supported; send 16-bit PCM WAV",
            param=f"{where}.format",
            code="invalid_audio",
        )
    raw, _ = decode_base64(data, f"{where}.data", "audio")

    def refuse(what: str) -> APIError:
        return APIError(400, f"audio: {what}; send 16-bit PCM WAV", param=f"{where}.data", code="invalid_audio")

    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(raw)) as wav:
            if wav.format not in ("WAV", "WAVEX"):
                raise refuse(f"the data is {wav.format}, not WAV")
            samples = wav.read(dtype="float32", always_2d=True)
            rate = wav.samplerate
    except soundfile.LibsndfileError as err:
        raise refuse(f"not a readable WAV file ({err.error_string})") from err
    if samples.size == 0:
        raise refuse("the WAV file has no samples")
    return samples.mean(axis=1, dtype=np.float32), rate
