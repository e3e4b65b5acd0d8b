"""Deterministic generator of the shipped default RAG task (fictional entities).

The task is a retrieval-augmented QA set over an invented world of people, companies, cities and
inventions, so an answer can only come from the retrieved documents, never from the model's memory.
Each split (``train`` / ``dev`` / ``test``) gets its *own* world (entity names are disjoint across
splits), so dev/test measure reading, not memorisation of train facts.

Every example follows the project's RAG JSONL schema plus a few extra fields::

    {"id": "train-00000", "system": SYSTEM_PROMPT, "question": str,
     "documents": [{"title": str, "text": str}, ...],      # retrieval rank order (shuffled)
     "answer": str, "answer_aliases": [str],                # extra accepted answers (may be empty)
     "gold_doc_indices": [int],                             # documents that state the needed facts
     "answerable": bool, "hops": 1 | 2}

* 1-hop questions need one passage ("Who founded Vaskorin Works?"), 2-hop questions need two
  ("What is the population of the city where Vaskorin Works is headquartered?").
* About 10% are unanswerable: the target passage is missing, or present but silent about the asked
  attribute, or the second hop is missing. Their answer is :data:`UNANSWERABLE_ANSWER` and their
  ``gold_doc_indices`` is empty.
* Distractors are passages about similar entities (mostly the same kind, same attribute types,
  different invented values), plus related entities (e.g. the founder of the asked company).
* Passages only state an entity's *own* (forward) facts, so the gold indices are exact: a person's
  passage never says which company they founded; the company's passage names its founder.

Regenerate the committed files with ``python -m selfaug_jax.data.default_task --out DIR`` (default:
the package assets directory). The output is a pure function of the arguments.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from pathlib import Path
from typing import Any, Callable

import yaml

from selfaug_jax.data.readers import iter_jsonl_objects

UNANSWERABLE_ANSWER = "The documents do not contain this information."
"""Fixed answer of the "not in the documents" examples (see ``selfaug_jax.eval.rag_metrics``)."""

SYSTEM_PROMPT = (
    "Answer the question using only the documents. Reply with a short answer (a name, a year, "
    "a place or a number). If the documents do not contain the answer, reply exactly: "
    + UNANSWERABLE_ANSWER
)
SPLITS = ("train", "dev", "test")
ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "default_task"
TEMPLATES_PATH = ASSETS_DIR / "templates.yaml"
"""Hand-written sentence/question templates and vocabularies (an input of the generator)."""


def _load_templates(path: Path = TEMPLATES_PATH) -> SimpleNamespace:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    required = ("ONSETS", "VOWELS", "CODAS", "REAL_WORDS", "COUNTRY_ENDINGS", "FIRST_NAMES_M", "FIRST_NAMES_F",
                "PROFESSIONS", "COMPANY_SUFFIXES", "INDUSTRIES", "DEVICES", "MATERIALS", "COLOURS", "INTROS",
                "ATTR_TEMPLATES", "COMBINED", "FILLERS", "FLAVOUR_WORDS", "THINGS", "ADJECTIVES", "TRAITS", "HOBBIES",
                "ANIMALS", "QUESTIONS", "N_DOCS_WEIGHTS", "N_FILLERS")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{path}: missing template keys {missing}")
    data["REAL_WORDS"] = set(data["REAL_WORDS"])
    data["COMBINED"] = {kind: {tuple(k.split("+")): v for k, v in d.items()} for kind, d in data["COMBINED"].items()}
    return SimpleNamespace(**data)


T = _load_templates()


# ----------------------------------------------------------------------------------------- world
@dataclass
class City:
    name: str
    country: str
    population: int
    river: str


@dataclass
class Person:
    name: str
    surname: str
    he: bool
    birth_year: int
    birth_city: City
    profession: str


@dataclass
class Company:
    name: str
    short: str
    industry: str
    founded: int
    founder: Person
    hq: City
    employees: int


@dataclass
class Invention:
    name: str  # e.g. "Quorvel loom" (used as "the Quorvel loom")
    device: str
    inventor: Person
    year: int
    material: str
    colour: str


@dataclass
class World:
    """All entities of one split. ``founded_by`` maps a person's name to the company they founded."""

    countries: list[str]
    cities: list[City]
    people: list[Person]
    companies: list[Company]
    inventions: list[Invention]
    founded_by: dict[str, Company] = field(default_factory=dict)


class NameFactory:
    """Invented, pronounceable, globally unique names (uniqueness shared across splits)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self, lo: int = 2, hi: int = 3, ending: str = "") -> str:
        """One capitalised invented word of ``lo..hi`` syllables, unique over the factory."""
        for _ in range(1000):
            n = self.rng.randint(lo, hi)
            w = "".join(self.rng.choice(T.ONSETS) + self.rng.choice(T.VOWELS) for _ in range(n))
            w = (w + self.rng.choice(T.CODAS) + ending).capitalize()
            if len(w) >= 5 and w.lower() not in self.used and w.lower() not in T.REAL_WORDS:
                self.used.add(w.lower())
                return w
        raise RuntimeError("NameFactory: could not find a fresh name after 1000 tries")


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def build_world(rng: random.Random, names: NameFactory, n_questions: int) -> World:
    """Build a consistent world sized for ``n_questions`` questions."""
    n_cities = max(12, n_questions // 12)
    n_companies = max(12, n_questions // 8)
    n_inventions = max(10, n_questions // 10)
    n_extra_people = max(6, n_questions // 20)
    countries = [names.word(2, 2, rng.choice(T.COUNTRY_ENDINGS)) for _ in range(max(4, n_questions // 150))]
    cities = []
    for _ in range(n_cities):
        pop = rng.choice([rng.randint(200, 9000), rng.randint(1000, 90000), rng.randint(10000, 900000)])
        cities.append(City(names.word(2, 3), rng.choice(countries), pop * 10 if pop < 9000 else pop,
                           names.word(2, 2)))
    people = []
    for _ in range(n_companies + n_inventions + n_extra_people):
        he = rng.random() < 0.5
        first = rng.choice(T.FIRST_NAMES_M if he else T.FIRST_NAMES_F)
        surname = names.word(2, 3)
        people.append(Person(f"{first} {surname}", surname, he, rng.randint(1780, 1965),
                             rng.choice(cities), rng.choice(T.PROFESSIONS)))
    order = list(people)
    rng.shuffle(order)
    founders, inventors = order[:n_companies], order[n_companies:n_companies + n_inventions]
    companies = []
    for p in founders:
        short = names.word(2, 3)
        companies.append(Company(f"{short} {rng.choice(T.COMPANY_SUFFIXES)}", short, rng.choice(T.INDUSTRIES),
                                 p.birth_year + rng.randint(22, 55), p, rng.choice(cities),
                                 rng.choice([rng.randint(12, 400), rng.randint(400, 40000)])))
    inventions = []
    for p in inventors:
        device = rng.choice(sorted(T.DEVICES))
        inventions.append(Invention(f"{names.word(2, 3)} {device}", device, p, p.birth_year + rng.randint(20, 50),
                                    rng.choice(T.MATERIALS), rng.choice(T.COLOURS)))
    world = World(countries, cities, people, companies, inventions)
    world.founded_by = {c.founder.name: c for c in companies}
    return world


# -------------------------------------------------------------------------------------- passages
def _poss(name: str) -> str:
    return name + ("'" if name.endswith("s") else "'s")


def _an(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _fill(rng: random.Random, template: str, refs: dict[str, list[str]], values: dict[str, str]) -> str:
    """Fill ``{S}`` (sentence-initial subject), ``{o}`` (mid-sentence reference), ``{P}``/``{p}``
    (possessive) from ``refs`` and the remaining slots from ``values``; capitalise the sentence."""
    slots = {k: rng.choice(v) for k, v in refs.items()}
    text = template.format(**slots, **values)
    return text[0].upper() + text[1:]


def _refs(kind: str, e: Any) -> dict[str, list[str]]:
    if kind == "company":
        return {"S": [e.name, e.name, "The company", "The firm", e.short, "It"],
                "o": [e.name, "the company", "the firm", e.short], "P": ["Its", _poss(e.name)]}
    if kind == "person":
        pro, pos = ("he", "his") if e.he else ("she", "her")
        return {"S": [e.name, e.surname, e.surname, pro.capitalize()], "o": [e.name, e.surname],
                "P": [pos.capitalize(), _poss(e.surname)]}
    if kind == "city":
        return {"S": [e.name, e.name, "The city", "It"], "o": [e.name, "the city"], "P": ["Its", _poss(e.name)]}
    return {"S": [f"The {e.name}", f"The {e.device}", "The device", "It"],
            "o": [f"the {e.name}", f"the {e.device}"], "P": ["Its", "The " + _poss(e.device)]}


def _attr_values(kind: str, e: Any) -> dict[str, dict[str, str]]:
    """Per attribute, the template slot values that state it."""
    if kind == "company":
        return {"founded": {"v": str(e.founded)}, "founder": {"v": e.founder.name},
                "hq": {"v": e.hq.name}, "employees": {"v": _fmt_int(e.employees)}}
    if kind == "person":
        return {"birth_year": {"v": str(e.birth_year)}, "birth_city": {"v": e.birth_city.name},
                "profession": {"v": e.profession, "av": _an(e.profession)}}
    if kind == "city":
        return {"country": {"v": e.country}, "population": {"v": _fmt_int(e.population)}, "river": {"v": e.river}}
    return {"inventor": {"v": e.inventor.name}, "year": {"v": str(e.year)}, "material": {"v": e.material},
            "colour": {"v": e.colour}}


def _intro_values(kind: str, e: Any) -> dict[str, str]:
    if kind == "company":
        return {"N": e.name, "industry": e.industry, "a_industry": _an(e.industry)}
    if kind == "invention":
        return {"N": e.name, "use": T.DEVICES[e.device]}
    return {"N": e.name}


def render_passage(rng: random.Random, world: World, kind: str, e: Any, omit: frozenset = frozenset(),
                   n_fillers: int = 2) -> dict[str, str]:
    """A natural-language passage about entity ``e``: an intro sentence naming it, one sentence per
    attribute not in ``omit`` (in random order, sometimes merged), and ``n_fillers`` flavour
    sentences that state none of the asked attributes."""
    refs = {**_refs(kind, e), "n": [e.name]}
    values = _attr_values(kind, e)
    sentences = [_fill(rng, rng.choice(T.INTROS[kind]), {}, _intro_values(kind, e))]
    attrs = [a for a in values if a not in omit]
    body = []
    for pair, templates in T.COMBINED.get(kind, {}).items():
        if set(pair) <= set(attrs) and rng.random() < 0.35:
            vals = {f"v{i}": values[a]["v"] for i, a in enumerate(pair)}
            body.append(_fill(rng, rng.choice(templates), refs, vals))
            attrs = [a for a in attrs if a not in pair]
    for a in attrs:
        body.append(_fill(rng, rng.choice(T.ATTR_TEMPLATES[kind][a]), refs, values[a]))
    others = [c.name for c in world.cities if c.name not in {values.get(a, {}).get("v") for a in values}]
    base_year = {"company": getattr(e, "founded", 0), "person": getattr(e, "birth_year", 0) + 25,
                 "invention": getattr(e, "year", 0)}.get(kind, 1850)
    for tpl in rng.sample(T.FILLERS[kind], k=min(n_fillers, len(T.FILLERS[kind]))):
        fv = {"later": str(min(base_year + rng.randint(3, 40), 2024)), "other_city": rng.choice(others),
              "k": str(rng.randint(2, 60)), "word": rng.choice(T.FLAVOUR_WORDS),
              "thing": rng.choice(T.THINGS), "adj": rng.choice(T.ADJECTIVES), "adj2": rng.choice(T.ADJECTIVES),
              "season": rng.choice(["spring", "summer", "autumn", "winter"]), "hobby": rng.choice(T.HOBBIES),
              "animal": rng.choice(T.ANIMALS)}
        t1, t2 = rng.sample(T.TRAITS, 2)
        fv.update(a_word=_an(fv["word"]), a_adj=_an(fv["adj"]), A_adj=_an(fv["adj"]).capitalize(),
                  a_animal=_an(fv["animal"]), trait=t1, trait2=t2)
        body.append(_fill(rng, tpl, refs, fv))
    rng.shuffle(body)
    return {"title": e.name, "text": " ".join(sentences + body)}


# ------------------------------------------------------------------------------------- questions
@dataclass(frozen=True)
class QType:
    """A question type: the kind of its first entity, the hops (entity getters), the asked attribute
    of the last hop and the answer getter."""

    name: str
    kind: str
    hops: tuple[tuple[str, Callable[[Any], Any]], ...]  # (kind, entity -> entity of this hop)
    attr: str  # attribute of the last hop's entity that carries the answer
    answer: Callable[[Any], str]
    aliases: Callable[[Any], list[str]] = lambda e: []


def _num_alias(n: int) -> list[str]:
    return [str(n)] if n >= 1000 else []


_I = lambda e: e  # noqa: E731
QTYPES: tuple[QType, ...] = (
    QType("company_founded", "company", (("company", _I),), "founded", lambda e: str(e.founded)),
    QType("company_hq", "company", (("company", _I),), "hq", lambda e: e.hq.name),
    QType("company_founder", "company", (("company", _I),), "founder", lambda e: e.founder.name),
    QType("company_employees", "company", (("company", _I),), "employees", lambda e: _fmt_int(e.employees),
          lambda e: _num_alias(e.employees)),
    QType("person_birth_year", "person", (("person", _I),), "birth_year", lambda e: str(e.birth_year)),
    QType("person_birth_city", "person", (("person", _I),), "birth_city", lambda e: e.birth_city.name),
    QType("person_profession", "person", (("person", _I),), "profession", lambda e: e.profession),
    QType("city_population", "city", (("city", _I),), "population", lambda e: _fmt_int(e.population),
          lambda e: _num_alias(e.population)),
    QType("city_country", "city", (("city", _I),), "country", lambda e: e.country),
    QType("city_river", "city", (("city", _I),), "river", lambda e: e.river, lambda e: [f"{e.river} River"]),
    QType("invention_inventor", "invention", (("invention", _I),), "inventor", lambda e: e.inventor.name),
    QType("invention_year", "invention", (("invention", _I),), "year", lambda e: str(e.year)),
    QType("invention_material", "invention", (("invention", _I),), "material", lambda e: e.material),
    QType("invention_colour", "invention", (("invention", _I),), "colour", lambda e: e.colour),
    QType("founder_birth_year", "company", (("company", _I), ("person", lambda e: e.founder)), "birth_year",
          lambda e: str(e.founder.birth_year)),
    QType("founder_birth_city", "company", (("company", _I), ("person", lambda e: e.founder)), "birth_city",
          lambda e: e.founder.birth_city.name),
    QType("hq_population", "company", (("company", _I), ("city", lambda e: e.hq)), "population",
          lambda e: _fmt_int(e.hq.population), lambda e: _num_alias(e.hq.population)),
    QType("hq_country", "company", (("company", _I), ("city", lambda e: e.hq)), "country", lambda e: e.hq.country),
    QType("inventor_birth_city", "invention", (("invention", _I), ("person", lambda e: e.inventor)), "birth_city",
          lambda e: e.inventor.birth_city.name),
    QType("inventor_birth_year", "invention", (("invention", _I), ("person", lambda e: e.inventor)), "birth_year",
          lambda e: str(e.inventor.birth_year)),
    QType("person_country", "person", (("person", _I), ("city", lambda e: e.birth_city)), "country",
          lambda e: e.birth_city.country),
)
_ONE_HOP = [q for q in QTYPES if len(q.hops) == 1]
_TWO_HOP = [q for q in QTYPES if len(q.hops) == 2]


def _pool(world: World, kind: str) -> list[Any]:
    return {"company": world.companies, "person": world.people, "city": world.cities,
            "invention": world.inventions}[kind]


def _question_text(rng: random.Random, q: QType, e: Any) -> str:
    return rng.choice(T.QUESTIONS[q.name]).format(X=e.name)


def make_example(rng: random.Random, world: World, ex_id: str, unanswerable: bool, two_hop: bool) -> dict:
    """One example: pick a question type and entity, choose gold + distractor passages, shuffle."""
    q = rng.choice(_TWO_HOP if two_hop else _ONE_HOP)
    e = rng.choice(_pool(world, q.kind))
    chain = [(kind, get(e)) for kind, get in q.hops]
    omit: dict[int, frozenset] = {}
    present = list(range(len(chain)))
    if unanswerable:
        # drop the last hop's passage, or keep it but silent about the asked attribute
        if rng.random() < 0.5:
            present = present[:-1]
        else:
            omit[len(chain) - 1] = frozenset({q.attr})
    n_docs = rng.choices(range(3, 13), weights=T.N_DOCS_WEIGHTS)[0]
    chosen: list[tuple[str, Any]] = [chain[i] for i in present]
    seen = {id(x) for _, x in chain}  # never use a chain entity as a distractor
    related = []
    if q.kind == "company":
        related = [("person", e.founder), ("city", e.hq)]
    elif q.kind == "invention":
        related = [("person", e.inventor)]
    elif q.kind == "person":
        related = [("city", e.birth_city)] + ([("company", world.founded_by[e.name])] if e.name in world.founded_by else [])
    distractors = [r for r in related if id(r[1]) not in seen and rng.random() < 0.4]
    kinds = [k for k, _ in chain]
    for _ in range(100_000):
        if len(chosen) + len(distractors) >= n_docs:
            break
        kind = rng.choice(kinds) if rng.random() < 0.8 else rng.choice(["company", "person", "city", "invention"])
        cand = rng.choice(_pool(world, kind))
        if id(cand) not in seen and all(cand is not d for _, d in distractors):
            distractors.append((kind, cand))
    else:
        raise RuntimeError(f"{ex_id}: world too small to draw {n_docs} distinct documents")
    docs = [(True, i, k, x) for i, (k, x) in zip(present, chosen)] + [(False, -1, k, x) for k, x in distractors]
    rng.shuffle(docs)
    documents, gold = [], []
    for idx, (is_gold, hop, kind, x) in enumerate(docs):
        documents.append(render_passage(rng, world, kind, x, omit.get(hop, frozenset()) if is_gold else frozenset(),
                                        n_fillers=rng.choice(T.N_FILLERS)))
        if is_gold and not unanswerable:
            gold.append(idx)
    return {
        "id": ex_id,
        "system": SYSTEM_PROMPT,
        "question": _question_text(rng, q, e),
        "documents": documents,
        "answer": UNANSWERABLE_ANSWER if unanswerable else q.answer(e),
        "answer_aliases": [] if unanswerable else q.aliases(e),
        "gold_doc_indices": gold,
        "answerable": not unanswerable,
        "hops": len(chain),
    }


def generate_default_task(seed: int = 0, n_train: int = 2000, n_dev: int = 200, n_test: int = 200,
                          unanswerable_frac: float = 0.10, two_hop_frac: float = 0.25) -> dict[str, list[dict]]:
    """Generate the three splits. Pure function of the arguments (Python's seeded ``random``).

    Each split draws from its own world; names are unique across all splits. Exactly
    ``round(unanswerable_frac * n)`` examples per split are unanswerable and
    ``round(two_hop_frac * n)`` are two-hop (these sets overlap independently at random).
    """
    for name, n in (("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"generate_default_task: {name} must be a non-negative int, got {n!r}")
    if not (0.0 <= unanswerable_frac <= 1.0 and 0.0 <= two_hop_frac <= 1.0):
        raise ValueError("generate_default_task: unanswerable_frac and two_hop_frac must be in [0, 1]")
    names = NameFactory(random.Random(f"selfaug-default-task-names-{seed}"))
    out: dict[str, list[dict]] = {}
    for split, n in zip(SPLITS, (n_train, n_dev, n_test)):
        rng = random.Random(f"selfaug-default-task-{seed}-{split}")
        world = build_world(rng, names, n)
        flags_u = [i < round(unanswerable_frac * n) for i in range(n)]
        flags_h = [i < round(two_hop_frac * n) for i in range(n)]
        rng.shuffle(flags_u)
        rng.shuffle(flags_h)
        out[split] = [make_example(rng, world, f"{split}-{i:05d}", flags_u[i], flags_h[i]) for i in range(n)]
    return out


def to_jsonl(records: list[dict]) -> str:
    """Canonical serialisation used for the committed files (one compact JSON object a line)."""
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)


def write_default_task(out_dir: str | Path = ASSETS_DIR, **kwargs: Any) -> dict[str, Path]:
    """Generate and write ``{out_dir}/{train,dev,test}.jsonl``; returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, records in generate_default_task(**kwargs).items():
        paths[split] = out_dir / f"{split}.jsonl"
        paths[split].write_text(to_jsonl(records), encoding="utf-8")
    return paths


def load_default_task(split: str, assets_dir: str | Path = ASSETS_DIR) -> list[dict]:
    """Read one committed split (``train``, ``dev`` or ``test``) as a list of dicts."""
    if split not in SPLITS:
        raise ValueError(f"load_default_task: split must be one of {SPLITS}, got {split!r}")
    return [rec for _, rec in iter_jsonl_objects(Path(assets_dir) / f"{split}.jsonl")]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Regenerate the default fictional RAG task (JSONL).")
    ap.add_argument("--out", default=str(ASSETS_DIR), help="output directory (default: package assets)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-dev", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=200)
    a = ap.parse_args(argv)
    paths = write_default_task(a.out, seed=a.seed, n_train=a.n_train, n_dev=a.n_dev, n_test=a.n_test)
    for split, p in paths.items():
        print(f"{split}: {p} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
