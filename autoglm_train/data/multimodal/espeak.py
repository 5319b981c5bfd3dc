"""Synthesized speech → transcript pairs with eSpeak NG (``espeakng-loader``: the library + voices in a wheel).

Utterances are short phrases of spoken digits, varied in voice, speed, pitch, loudness and
background noise, so a small encoder learns them on a CPU in minutes while WER stays a real
sequence metric. Synthesis is ~1 ms per utterance, so nothing is cached.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import random
from collections.abc import Sequence

import numpy as np
import torch

from autoglm_train.data.multimodal.pairs import DIGIT_WORDS, Pair
from autoglm_train.data.multimodal.report import SkipReport

log = logging.getLogger(__name__)

# espeak_ng.h: AUDIO_OUTPUT_SYNCHRONOUS, espeakRATE / espeakVOLUME / espeakPITCH, POS_CHARACTER, espeakCHARS_UTF8
_SYNCHRONOUS, _RATE, _VOLUME, _PITCH, _POS_CHARACTER, _CHARS_UTF8 = 2, 1, 2, 3, 1, 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

DEFAULT_VOICES = ("en", "en-us", "en+f2", "en+f4", "en+m3", "en+m7", "en-us+klatt", "en+croak")


class EspeakSynth:
    """eSpeak NG called through ctypes; one per process (the library keeps global state)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise ImportError("speech synthesis needs espeakng-loader: pip install 'autoglm-train[speech]'") from exc
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.restype = ctypes.c_int
        rate = self._lib.espeak_Initialize(_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({rate})")
        self.sampling_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept on self: ctypes must not garbage-collect it
        self._lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, count, events) -> int:
        if wav and count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0  # 0 = keep synthesizing

    def __call__(self, text: str, voice: str = "en", rate: int = 175, pitch: int = 50) -> np.ndarray:
        """int16 samples at ``sampling_rate`` for ``text``; ``rate`` in words/minute, ``pitch`` 0-99."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r} (try en, en-us, en+f3, en+m1, en+klatt)")
        self._lib.espeak_SetParameter(_RATE, int(rate), 0)
        self._lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        self._lib.espeak_SetParameter(_VOLUME, 100, 0)
        data = text.encode()
        self._chunks = []
        status = self._lib.espeak_Synth(
            ctypes.c_char_p(data), ctypes.c_size_t(len(data) + 1), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        self._lib.espeak_Synchronize()
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed ({status}) for {text!r}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


@functools.cache
def espeak() -> EspeakSynth:
    """The process-wide synthesizer."""
    return EspeakSynth()


class SpokenDigits:
    """Phrases of ``min_words``..``max_words`` digit words, each spoken with random voice, speed, pitch, noise.

    Args:
        num_utterances: how many clips to synthesize (every clip is different).
        min_words: shortest phrase.
        max_words: longest phrase.
        words: the vocabulary phrases are drawn from.
        voices: eSpeak NG voices and variants (``en+f3`` = English, female variant 3).
        rate: [low, high] speaking speed in words per minute.
        pitch: [low, high] base pitch, 0-99.
        snr_db: [low, high] signal-to-noise ratio of the added white noise, in dB.
        gain: [low, high] peak amplitude after normalisation.
        sampling_rate: output rate; eSpeak's 22,050 Hz is resampled to it (band-limited sinc).
        phrasings: ``[question, answer]`` pairs; ``{text}`` in the answer becomes the transcript.
        seed: every random choice.
    """

    modality = "audio"

    def __init__(
        self,
        num_utterances: int = 4000,
        min_words: int = 1,
        max_words: int = 3,
        words: Sequence[str] = DIGIT_WORDS,
        voices: Sequence[str] = DEFAULT_VOICES,
        rate: Sequence[int] = (130, 210),
        pitch: Sequence[int] = (25, 75),
        snr_db: Sequence[float] = (15.0, 35.0),
        gain: Sequence[float] = (0.3, 0.9),
        sampling_rate: int = 16000,
        phrasings: Sequence[Sequence[str]] = (("Transcribe the audio.", "{text}"),),
        seed: int = 0,
    ) -> None:
        if not 1 <= min_words <= max_words:
            raise ValueError(f"data_mm.source: need 1 <= min_words <= max_words, got {min_words}, {max_words}")
        if not words or not voices:
            raise ValueError("data_mm.source: words and voices must not be empty")
        if not phrasings or any(len(p) != 2 or "{text}" not in p[1] for p in phrasings):
            raise ValueError("data_mm.source.phrasings: each entry is [question, answer] with {text} in the answer")
        self.num_utterances = num_utterances
        self.min_words, self.max_words = min_words, max_words
        self.words, self.voices = list(words), list(voices)
        self.rate, self.pitch, self.snr_db, self.gain = tuple(rate), tuple(pitch), tuple(snr_db), tuple(gain)
        self.sampling_rate = sampling_rate
        self.phrasings = [tuple(p) for p in phrasings]
        self.seed = seed

    def load(self, report: SkipReport) -> list[Pair]:
        synth = espeak()
        rng = random.Random(self.seed)
        noise = np.random.default_rng(self.seed)
        waves, texts, wheres = [], [], []
        for index in range(self.num_utterances):
            report.seen += 1
            text = " ".join(rng.choice(self.words) for _ in range(rng.randint(self.min_words, self.max_words)))
            voice = rng.choice(self.voices)
            where = f"espeak[{index}] {voice} {text!r}"
            pcm = synth(text, voice, rng.randint(*self.rate), rng.randint(*self.pitch))
            if pcm.size == 0 or not pcm.any():
                report.skip("empty synthesis", where)
                continue
            wave = pcm.astype(np.float32) / 32768.0
            wave *= rng.uniform(*self.gain) / float(np.abs(wave).max())
            snr = rng.uniform(*self.snr_db)
            wave += noise.standard_normal(wave.size).astype(np.float32) * np.sqrt(np.mean(wave**2) / 10 ** (snr / 10))
            waves.append(wave)
            texts.append(text)
            wheres.append(where)
        if synth.sampling_rate != self.sampling_rate:
            waves = resample_all(waves, synth.sampling_rate, self.sampling_rate)
            report.note(f"resampled {synth.sampling_rate} -> {self.sampling_rate} Hz", len(waves))
        pairs = []
        for wave, text, where in zip(waves, texts, wheres, strict=True):
            question, answer = rng.choice(self.phrasings)
            pairs.append(Pair(wave, question, answer.format(text=text), None, where))
        return pairs


def resample_all(waves: list[np.ndarray], orig_sr: int, new_sr: int) -> list[np.ndarray]:
    """Resample each clip with the plugin's own :func:`~autoglm_train.model.plugins.speech.resample`.

    Training data goes through the function that ``SpeechPlugin.preprocess`` applies at serving time.
    """
    from autoglm_train.model.plugins.speech import resample

    return [resample(torch.from_numpy(np.asarray(wave, np.float32)), orig_sr, new_sr).numpy() for wave in waves]
