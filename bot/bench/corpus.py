"""A generated corpus for measuring retrieval: facts, each written once among distractors (its
entity mentioned once more elsewhere, in a sentence that answers nothing), and a question per
fact worded apart from it: they share the entity and little else."""

from __future__ import annotations

import random
from dataclasses import dataclass

# (how the fact is written, how the question asks for it): they share the entity, little else.
FACTS = [
    (
        "The {e} initiative has an annual budget of {n} thousand euros.",
        "How much money does {e} get each year?",
    ),
    (
        "The kickoff meeting for {e} will be held in the {room} room on {day}.",
        "Where and when does {e} start?",
    ),
    (
        "Contractors assigned to {e} must give {n} days of notice before they leave.",
        "How long before quitting must people working on {e} warn us?",
    ),
    (
        "Hardware for {e} is supplied by {company}, a firm based in {city}.",
        "Which vendor provides the equipment for {e}?",
    ),
    (
        "{e} is led by {person}, who reports directly to the finance director.",
        "Who heads {e}?",
    ),
    (
        "Backups of the {e} database run every {n} hours.",
        "How often is the {e} data copied for safety?",
    ),
    (
        "The {e} warehouse stores roughly {n} pallets of spare parts.",
        "What stock capacity does the storage site of {e} have?",
    ),
    (
        "Visitors to the {e} site need a badge signed by the security office.",
        "What do guests require to enter {e}?",
    ),
]
DISTRACTORS = [
    "The cafeteria menu changes every Monday and vegetarian options are always offered.",
    "Please remember to lock your screen when you leave your desk.",
    "The quarterly all-hands meeting covers general company news and questions.",
    "Parking spaces are assigned by seniority and renewed every January.",
    "Expense reports must be filed within thirty days of the purchase.",
    "The printer on the third floor is out of order until further notice.",
    "New employees receive their laptops on the first day of work.",
    "Travel bookings above five hundred euros need a manager's approval.",
    "The office closes early on the last Friday of every month.",
    "Feedback forms are collected anonymously by human resources.",
]
SYLLABLES = ["var", "nok", "tel", "mi", "ra", "zan", "dor", "qui", "lex", "bo", "sen", "tu"]


@dataclass(frozen=True, slots=True)
class Corpus:
    documents: list[tuple[str, str]]  # (file name, text)
    questions: list[tuple[str, str, str]]  # (question, the fact's sentence, its file)


def corpus(docs: int = 50, facts_per_doc: int = 4, seed: int = 7) -> Corpus:
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < docs * facts_per_doc:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize())
    entities = sorted(names)
    rng.shuffle(entities)
    texts: list[list[str]] = [[] for _ in range(docs)]
    questions: list[tuple[str, str, str]] = []
    for i, entity in enumerate(entities):
        doc = i // facts_per_doc
        fact, question = FACTS[i % len(FACTS)]
        values = {
            "e": entity,
            "n": rng.randint(3, 900),
            "room": rng.choice(["Aurora", "Birch", "Cedar", "Delta"]),
            "day": rng.choice(["Monday", "Tuesday", "Thursday"]),
            "company": rng.choice(["Norbridge Ltd", "Altek GmbH", "Kestrel Systems"]),
            "city": rng.choice(["Lyon", "Graz", "Porto"]),
            "person": rng.choice(["Dana Whitfield", "Omar Haddad", "Lena Park"]),
        }
        sentence = fact.format(**values)
        texts[doc].append(sentence)
        questions.append((question.format(**values), sentence, f"doc{doc:02d}.txt"))
        # The entity once more, elsewhere, in a sentence that answers nothing.
        other = (doc + 1 + rng.randrange(docs - 1)) % docs
        texts[other].append(f"{entity} was mentioned briefly at the last planning session.")
    for text in texts:
        text.extend(rng.sample(DISTRACTORS, 6))
        rng.shuffle(text)
    documents = [(f"doc{d:02d}.txt", "\n".join(t)) for d, t in enumerate(texts)]
    return Corpus(documents, questions)
