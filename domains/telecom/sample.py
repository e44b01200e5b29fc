"""Deterministic generator of a small SYNTHETIC telecom text sample, in the real on-disk formats.

Not TeleQnA and not written by telecom experts: short templated statements about the functions of
network elements, protocol layers and channels (standard textbook facts), generated so the telecom pack
runs offline end to end. Two files:

- ``instructions.jsonl``: instruction-tuning records (``instruction``, optional ``input``, ``response``):
  multiple-choice drills in the same question layout the test uses, plus short definition questions;
- ``teleqna_sample.json``: multiple-choice questions in the TeleQnA layout (``{"question 0": {...}}`` with
  ``question``, ``option 1`` .. ``option N``, ``answer`` = ``"option k: text"``, ``explanation``,
  ``category``), on the same facts with other distractors and option orders than the training drills.

Same seed -> same bytes. Run ``python -m domains.telecom.sample OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from vision_ft.data.mcq import MCQItem, answer_text, mcq_prompt
from vision_ft.io import atomic_write_text

SAMPLE_FILES = ("instructions.jsonl", "teleqna_sample.json")

#: (term, what it is / does, category)
FACTS: list[tuple[str, str, str]] = [
    ("AMF", "access and mobility management in the 5G core", "Standards overview"),
    ("SMF", "session management in the 5G core", "Standards overview"),
    ("UPF", "forwarding of user plane traffic in the 5G core", "Standards overview"),
    ("AUSF", "authentication of subscribers in the 5G core", "Standards overview"),
    ("UDM", "storage of subscription data in the 5G core", "Standards overview"),
    ("PCF", "policy control in the 5G core", "Standards overview"),
    ("NRF", "registration and discovery of network functions", "Standards overview"),
    ("gNB", "the 5G New Radio base station", "Lexicon"),
    ("eNB", "the LTE base station", "Lexicon"),
    ("MME", "mobility management in the LTE core", "Lexicon"),
    ("HARQ", "fast retransmission with soft combining at the MAC layer", "Standards specifications"),
    ("RRC", "radio resource control signalling between the UE and the base station", "Standards specifications"),
    ("PDCP", "header compression and ciphering above RLC", "Standards specifications"),
    ("RLC", "segmentation and ARQ retransmission below PDCP", "Standards specifications"),
    ("PDCCH", "the downlink control channel carrying scheduling grants", "Standards specifications"),
    ("PDSCH", "the downlink shared channel carrying user data", "Standards specifications"),
    ("PUSCH", "the uplink shared channel carrying user data", "Standards specifications"),
    ("PUCCH", "the uplink control channel carrying acknowledgements", "Standards specifications"),
    ("MIMO", "transmission of several layers over multiple antennas", "Lexicon"),
    ("OFDM", "modulation on many orthogonal subcarriers", "Lexicon"),
    ("network slicing", "several logical networks on one physical network", "Research overview"),
    ("carrier aggregation", "combining several component carriers for more bandwidth", "Research overview"),
    ("beamforming", "steering energy towards a user with antenna arrays", "Research overview"),
    ("bandwidth part", "a subset of the carrier bandwidth configured for a UE", "Standards specifications"),
]

_QUESTIONS = ["What does the {term} provide?", "Which function is handled by the {term}?",
              "In telecom networks, what is the role of the {term}?", "What is the {term} responsible for?"]


def _draw(rng: random.Random, i: int, n_options: int) -> tuple[list[str], int]:
    """Options for fact ``i``: its description and ``n_options - 1`` distractors, shuffled; the answer index."""
    others = [f[1] for j, f in enumerate(FACTS) if j != i]
    options = rng.sample(others, n_options - 1) + [FACTS[i][1]]
    rng.shuffle(options)
    return options, options.index(FACTS[i][1])


def build(seed: int = 0, drills_per_fact: int = 6, questions_per_fact: int = 2) -> tuple[list[dict], dict]:
    """The instruction records and the TeleQnA-layout questions (a dict ``"question k" -> record``)."""
    rng = random.Random(seed)
    records: list[dict] = []
    for i, (term, desc, cat) in enumerate(FACTS):
        records.append({"instruction": f"Define {term} in one sentence.", "response": f"{term}: {desc}."})
        for _ in range(drills_per_fact):
            options, k = _draw(rng, i, rng.choice([4, 5]))
            item = MCQItem(id="", question=rng.choice(_QUESTIONS).format(term=term), options=tuple(options), answer=k)
            records.append({"instruction": mcq_prompt(item), "response": answer_text(item, k)})
    rng.shuffle(records)
    questions: dict[str, dict] = {}
    test_rng = random.Random(seed + 1)
    for i, (term, desc, cat) in enumerate(FACTS):
        for _ in range(questions_per_fact):
            options, k = _draw(test_rng, i, test_rng.choice([2, 3, 4, 5]))
            q = {"question": test_rng.choice(_QUESTIONS).format(term=term) + " [synthetic sample]"}
            q.update({f"option {j + 1}": o for j, o in enumerate(options)})
            q.update(answer=f"option {k + 1}: {options[k]}", explanation=f"The {term} provides {desc}.",
                     category=cat)
            questions[f"question {len(questions)}"] = q
    return records, questions


def write_sample(out_dir: str | Path, seed: int = 0) -> Path:
    """Write both files into ``out_dir`` (atomically: a concurrent writer leaves a whole file)."""
    out = Path(out_dir)
    records, questions = build(seed)
    atomic_write_text(out / SAMPLE_FILES[0], "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(out / SAMPLE_FILES[1], json.dumps(questions, indent=1) + "\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(write_sample(a.out_dir, a.seed))


if __name__ == "__main__":
    main()
