"""Built-in bilingual synthetic corpus: Ke-SpeechChat dialogues spoken by espeak-ng, made offline in about a minute.

    python -m lit_keomni prepare            # calls build_corpus(out_dir)

Notable features
- Text is a seeded "toy world" in English and Chinese: people with a favourite colour, pet, food, home town, job, hobby
  and age; capitals of made-up countries; arithmetic and counting with numbers written as words (seven / 七, so a
  transcript is unambiguous); short stories with a right and a wrong ending (`storycloze_items`). Every stage has
  something learnable and `eval` has questions with known answers. Every utterance text is unique across the corpus,
  so a held-out split holds unseen sentences.
- A dialogue is 1-3 exchanges (user asks, agent answers); follow-ups refer back ("And where does she live?",
  "Now add three to that.").
- Speech comes from espeak-ng (the `espeakng-loader` wheel ships the library and its voices) through ctypes. User
  speakers are voice variant x pitch x rate (x English accent); the two agents `agentFemale` and `agentMale` are fixed,
  since one vocoder is trained per agent voice. Word timestamps (our ``words`` field) come from espeak-ng WORD events.
- Deterministic: the same seed gives identical JSON and identical wav bytes, whatever the number of workers.

Output: ``out_dir/<id>.json`` per dialogue, wavs in ``out_dir/<id>/<id>_<turn>_<speaker>.wav``, and a ``corpus.json``
stamp written last; the corpus is built in a temporary sibling folder and renamed into place, so an interrupted build
never looks finished.
"""

from __future__ import annotations

import _ctypes
import atexit
import ctypes
import json
import multiprocessing
import os
import random
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from datamodules.kespeechchat import STAMP_NAME, Dialogue, Turn, Word, write_dialogue
from datamodules.toy_world import ToyWorld, plan_dialogues, split_words, storycloze_items, toy_world_texts

__all__ = ["build_corpus", "synthesize", "storycloze_items", "toy_world_texts", "split_words", "ESPEAK_SAMPLE_RATE",
           "USER_SPEAKERS", "AGENT_SPEAKERS"]
