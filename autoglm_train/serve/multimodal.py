"""Chat content parts → template-ready text with placeholder tokens + the raw items for each plugin.

``image_url`` parts must carry ``data:`` URLs (base64): the server never fetches http(s) URLs.
``input_audio`` parts carry base64 WAV. Each part becomes ``num_tokens`` copies of its plugin's
placeholder token at its place in the text; the decoded image/waveform goes to that plugin.
Every failure is an :class:`APIError` 400 naming the part (``messages[i].content[j]``).
"""

from __future__ import annotations

import base64
import binascii
import io
import wave
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoglm_train.serve.errors import APIError
from autoglm_train.serve.schemas import AudioPart, ChatMessage, ImagePart, OtherPart, TextPart

# Which plugin placeholder a content part type feeds, and the modality it is in words.
PART_PLACEHOLDER = {"image_url": "<|image|>", "input_audio": "<|audio|>"}
PART_MODALITY = {"image_url": "image", "input_audio": "audio"}


@dataclass(frozen=True)
class PluginSlot:
    """What the parser needs to know of a plugin without building it."""

    name: str
    placeholder: str
    num_tokens: int


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
            text = "".join(pieces)
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
    if isinstance(part, OtherPart):
        raise APIError(
            400,
            f"content part type '{part.type}' is not supported; supported types: text, "
            + ", ".join(f"{t} ({PART_MODALITY[t]})" for t in PART_PLACEHOLDER),
            param=f"{where}.type",
            code="unsupported_content_type",
        )
    kind = "image_url" if isinstance(part, ImagePart) else "input_audio"
    slot = slots.get(kind)
    if slot is None:
        have = ", ".join(f"{s.name} ({PART_MODALITY[t]})" for t, s in slots.items()) or "none"
        raise APIError(
            400,
            f"this model has no {PART_MODALITY[kind]} plugin, so '{kind}' content cannot be used "
            f"(modality '{PART_MODALITY[kind]}' missing from the bundle; plugins: {have})",
            param=f"{where}.type",
            code="unsupported_modality",
        )
    if parsed.items.get(slot.name):
        raise APIError(
            400,
            f"at most one {PART_MODALITY[kind]} per request: the {slot.name} plugin fuses one item per sequence",
            param=where,
            code="too_many_items",
        )
    if isinstance(part, ImagePart):
        item = decode_image(part.image_url.url, f"{where}.image_url.url", max_pixels)
    else:
        assert isinstance(part, AudioPart)
        item = decode_audio(part.input_audio.data, part.input_audio.format, f"{where}.input_audio")
    parsed.items.setdefault(slot.name, []).append(item)
    return slot.placeholder * slot.num_tokens


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
    """Base64 PCM WAV → ``(mono float32 waveform in [-1, 1], sampling rate)``."""
    if fmt.lower() != "wav":
        raise APIError(
            400,
            f"input_audio: format {fmt!r} is not supported; send 16-bit PCM WAV",
            param=f"{where}.format",
            code="invalid_audio",
        )
    raw, _ = decode_base64(data, f"{where}.data", "audio")
    try:
        with wave.open(io.BytesIO(raw), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as err:
        raise APIError(
            400, f"audio: not a readable PCM WAV file ({err})", param=f"{where}.data", code="invalid_audio"
        ) from err
    if width not in (1, 2, 4) or not frames or rate < 1:
        raise APIError(
            400,
            f"audio: {8 * width}-bit WAV with {len(frames)} bytes is not supported; send 16-bit PCM",
            param=f"{where}.data",
            code="invalid_audio",
        )
    if width == 1:  # 8-bit WAV is unsigned
        samples = (np.frombuffer(frames, np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        dtype = np.int16 if width == 2 else np.int32
        samples = np.frombuffer(frames, dtype).astype(np.float32) / float(np.iinfo(dtype).max + 1)
    samples = samples[: len(samples) - len(samples) % channels].reshape(-1, channels).mean(axis=1)
    return samples.astype(np.float32), rate
