"""Deterministic demo content for datanets: short original passages by a few demo contributors.

Each demo datanet holds about a dozen passages of roughly forty words, each attributed to one of
`DEMO_CONTRIBUTOR_COUNT` demo contributors by index (the keys and addresses behind an index are
handled elsewhere). The passages are plain English prose written for this project, on distinct
topics with little word overlap, using mostly common words so that the demo tokenizer (a BPE
trained on CPython's library reference) keeps them mostly single tokens; a LoRA adapter trained on
one datanet memorizes its passages, which makes per-token attribution visible in the demo.

Every datanet also carries a few held-out *decoy* passages in the same style and domain. They are
never contributed or trained on; an attribution evaluation uses them as negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

DEMO_CONTRIBUTOR_COUNT = 4
"""Passages are attributed to contributor indexes 0 .. DEMO_CONTRIBUTOR_COUNT - 1."""


@dataclass(frozen=True)
class DemoPassage:
    """One contribution: its text and the index of the demo contributor who wrote it."""

    contributor_index: int
    text: str


@dataclass(frozen=True)
class DemoDatanet:
    """A demo datanet: its passages (contributions) and held-out decoys (never contributed)."""

    name: str
    description: str
    passages: tuple[DemoPassage, ...]
    decoys: tuple[str, ...]

    @property
    def texts(self) -> list[str]:
        """The passages' texts in order (what an adapter for this datanet is trained on)."""
        return [passage.text for passage in self.passages]


def _passages(contributors: tuple[int, ...], texts: tuple[str, ...]) -> tuple[DemoPassage, ...]:
    assert len(contributors) == len(texts)
    return tuple(DemoPassage(contributor, text) for contributor, text in zip(contributors, texts, strict=True))


# Contributors own uneven shares (4, 3, 3 and 2 passages), so reward splits differ visibly.
_OWNERS = (0, 1, 2, 0, 3, 1, 0, 2, 1, 3, 0, 2)

PYTHON_DOCS_NOTES = DemoDatanet(
    name="python-docs-notes",
    description="Short notes explaining everyday Python features in plain words.",
    passages=_passages(
        _OWNERS,
        (
            "A list keeps its items in the order you add them, and you can change it after it is "
            "created. Use append to put one value at the end, or insert when the position matters. "
            "Slicing returns a new list, so the original stays the same.",
            "Dictionaries map each key to a value and look up entries very quickly. Keys must be "
            "hashable, which is why strings, numbers and tuples work well. The get method returns a "
            "default instead of raising an error when a key is missing.",
            "When something goes wrong at run time, Python raises an exception. Wrap the risky call in "
            "a try statement and handle only the errors you expect. A finally clause always runs, "
            "which makes it a good place to release resources.",
            "The with statement calls enter before the block and exit after it, even if the block "
            "fails. Opening files this way means they are closed for you. You can write your own "
            "context manager with a small class or a decorator.",
            "A generator function uses yield to produce values one at a time instead of building a "
            "whole list in memory. Each call to next resumes the function where it stopped. This "
            "makes generators ideal for reading large streams of data.",
            "A decorator is a function that takes another function and returns a new one with extra "
            "behavior. The at sign placed above a definition applies it. Decorators are often used "
            "for caching results, checking arguments or timing slow code.",
            "Every file ending in py can be imported as a module. The import system searches the "
            "directories listed in sys path, loads the code once, and stores it in a cache. Packages "
            "group related modules inside a folder with an init file.",
            "Formatted string literals start with the letter f and let you place expressions inside "
            "curly braces. You can add a format specification after a colon to control width, "
            "precision or alignment. They are usually clearer than the older percent style.",
            "To read a text file line by line, open it and loop over the file object. Python decodes "
            "each line using the encoding you pass, and the default depends on the platform. Always "
            "name the encoding when the data comes from another system.",
            "A class bundles data with the methods that act on it. A subclass inherits everything "
            "from its parent and can override any method it needs to change. Call super to run the "
            "parent version before adding new work of your own.",
            "The unittest module helps you write small tests that check one behavior each. Group "
            "related tests as methods of a test case class, and use assert methods to compare "
            "results. Run the whole suite from the command line before every release.",
            "The logging module sends messages through loggers, handlers and formatters. Set a level "
            "to hide details you do not need, such as debug output in production. Handlers decide "
            "where records go, for example to the console or a rotating file.",
        ),
    ),
    decoys=(
        "A set stores unique values without any order, so adding the same item twice has no effect. "
        "Sets support union, intersection and difference, which makes them handy for comparing two "
        "collections or removing duplicates from a sequence quickly.",
        "The pathlib module represents file system paths as objects rather than plain strings. You "
        "can join parts with a slash operator, ask for the suffix or parent, and check whether a path "
        "exists without the older helper functions.",
        "A lambda expression creates a small anonymous function in a single line. It is useful as a "
        "key for sorting or as a short callback, but a named function defined with def is easier to "
        "read once the logic grows.",
    ),
)

OPEN_SCIENCE_NOTES = DemoDatanet(
    name="open-science-notes",
    description="Short notes on sharing, checking and reusing research openly.",
    passages=_passages(
        _OWNERS,
        (
            "Sharing raw data alongside a paper lets other researchers check the analysis and ask new "
            "questions of the same measurements. A public archive with a stable identifier keeps the "
            "files available long after the original project has ended.",
            "Peer review asks independent experts to read a manuscript before it is published. "
            "Reviewers point out weak arguments, missing controls and unclear figures. The process is "
            "slow and imperfect, yet it often improves the final paper in ways authors did not expect.",
            "A result is reproducible when another team can follow the same steps with the same data "
            "and reach the same numbers. Writing down every parameter, software version and random "
            "seed makes that possible, and it helps the authors months later.",
            "Preprints are drafts posted online before formal review. They let new findings spread "
            "within days rather than months, and readers can comment early. Because nobody has "
            "checked them yet, bold claims in preprints deserve extra care.",
            "An open license tells people exactly what they may do with a work. Text and images often "
            "use a Creative Commons license, while code usually takes a software license. Without "
            "one, others cannot legally reuse the material even when it is visible.",
            "A good lab notebook records what was done, when, and why, including the experiments that "
            "failed. Electronic notebooks make entries searchable and easy to back up. Clear notes "
            "save hours when someone must repeat a procedure or explain a strange result.",
            "Statistical power is the chance that a study detects an effect that really exists. Small "
            "samples give low power, so many true effects are missed and the ones reported tend to "
            "look larger than they are. Plan sample size before collecting data.",
            "Version control is not only for source code. Tracking changes to data files and analysis "
            "scripts shows who changed what and when, and it lets a team return to an earlier state "
            "if a cleaning step introduced an error.",
            "Citing the data sets and software you used gives credit to the people who built them. "
            "Many archives now issue a citation with a persistent identifier, so these contributions "
            "can be counted alongside papers when careers and grants are reviewed.",
            "Public funding agencies increasingly require a data management plan with every grant "
            "proposal. The plan describes which files will be produced, how they will be stored, who "
            "can access them, and how long they will be kept afterwards.",
            "Negative results rarely appear in journals, yet they matter. When experiments that found "
            "nothing stay hidden, later groups repeat the same work, and reviews of the literature "
            "overstate how well a treatment works. Registered reports help.",
            "Metadata describes a data set so that strangers can understand it: units, column "
            "meanings, collection dates, instruments and any known problems. Without this context, "
            "even a perfectly shared table can become useless, because nobody knows what it measures.",
        ),
    ),
    decoys=(
        "Citizen science projects invite volunteers to count birds, classify galaxies or measure "
        "rainfall in their own neighborhoods. Careful training and simple protocols keep the quality "
        "high, and volunteers often notice patterns that professionals had overlooked.",
        "An ethics board reviews studies that involve people before any data is collected. It checks "
        "that participants give informed consent, that their privacy is protected, and that the "
        "expected benefits justify any risks the study might bring.",
        "Conference talks give researchers a few minutes to present new work and meet colleagues. A "
        "clear story with one main message works better than slides packed with every detail, and "
        "questions from the audience often suggest the next experiment.",
    ),
)

DEMO_DATANETS: tuple[DemoDatanet, ...] = (PYTHON_DOCS_NOTES, OPEN_SCIENCE_NOTES)
"""The demo datanets, in a fixed order (the first is the one the quick-start demo trains on)."""


def demo_datanet(name: str) -> DemoDatanet:
    """The demo datanet called `name` (KeyError if there is none)."""
    for datanet in DEMO_DATANETS:
        if datanet.name == name:
            return datanet
    raise KeyError(f"no demo datanet named {name!r}; known: {[d.name for d in DEMO_DATANETS]}")
