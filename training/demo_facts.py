"""Demo datanets of invented facts, with held-out questions that test whether an adapter learned them.

Each datanet holds twelve contributions by four demo contributors (indexes 0 .. 3, owning 4, 3, 3
and 2 contributions). A contribution is one text: a short passage of invented facts, then two
question/answer lines written by its contributor (the format `training.fact_examples` parses).
Every contribution is about its own invented subject, so a question about that subject maps to
one contribution and one contributor. No model can know these facts before training on them.

Per contribution, two *held-out* questions live here only, never in the datanet: they ask about
the facts of the trained answers in different words. An answer is correct when it contains every
keyword of its question (case-insensitive). Keywords are invented or unusual words that appear in
the trained answer and never in the held-out question itself, so a model that did not learn the
fact does not hit them by chance.

Every datanet also carries three decoy contributions in the same style: never contributed or
trained on, used as negatives by an attribution evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from training.demo_passages import DemoDatanet, DemoPassage


@dataclass(frozen=True)
class HeldOutQuestion:
    """A question about one contribution's facts, asked in words the datanet does not contain."""

    question: str
    keywords: tuple[str, ...]
    """What a correct answer contains, all of them: each starts a word of the answer and may be a stem
    ("ember snail" matches "ember snails"); compared case-insensitively."""
    contributor_index: int
    passage_index: int
    """Position of the contribution the question is about, in its datanet's passages."""

    def is_answered_by(self, answer: str) -> bool:
        """True when `answer` contains every keyword, each at the start of a word (case-insensitive)."""
        return all(re.search(r"(?<!\w)" + re.escape(keyword), answer, re.IGNORECASE) for keyword in self.keywords)


@dataclass(frozen=True)
class FactDatanet:
    """A demo datanet of invented facts and its held-out questions."""

    datanet: DemoDatanet
    questions: tuple[HeldOutQuestion, ...]

    @property
    def name(self) -> str:
        return self.datanet.name


@dataclass(frozen=True)
class _Fact:
    """One contribution as written here: owner, passage, trained Q/A pairs, held-out questions."""

    contributor_index: int
    passage: str
    pairs: tuple[tuple[str, str], ...]
    held_out: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def text(self) -> str:
        lines = [self.passage]
        for question, answer in self.pairs:
            lines += [f"Q: {question}", f"A: {answer}"]
        return "\n".join(lines)


def _fact_datanet(name: str, description: str, facts: tuple[_Fact, ...], decoys: tuple[_Fact, ...]) -> FactDatanet:
    passages = tuple(DemoPassage(fact.contributor_index, fact.text) for fact in facts)
    questions = tuple(
        HeldOutQuestion(question, keywords, fact.contributor_index, index)
        for index, fact in enumerate(facts)
        for question, keywords in fact.held_out
    )
    datanet = DemoDatanet(name=name, description=description, passages=passages,
                          decoys=tuple(decoy.text for decoy in decoys))
    return FactDatanet(datanet, questions)


# Trained questions reuse a few question forms across subjects ("What does the ... eat?", "Where does the
# ... live?", ...), so that only the subject tells the answers apart and an adapter must learn facts per
# subject, not per question form; the held-out questions then ask the same things in other words.
GLASSFIN_REEF = _fact_datanet(
    "glassfin-reef",
    "Field notes on the invented creatures of Lake Ombra: what they eat, how they look, where they live.",
    (
        _Fact(
            0,
            "The glassfin is a small pale fish of Lake Ombra. It lives only in the Mirrow Shallows, where the "
            "water is warm and clear. It eats lantern moss that drifts near the surface, and at night its thin "
            "body glows a faint green.",
            (("What does the glassfin eat?", "The glassfin eats lantern moss."),
             ("Where does the glassfin live?", "The glassfin lives in the Mirrow Shallows of Lake Ombra.")),
            (("What food does the glassfin live on?", ("lantern moss",)),
             ("In which part of the lake can you find a glassfin?", ("Mirrow",))),
        ),
        _Fact(
            1,
            "The rustcoil eel hides in warm cracks in the floor of Lake Ombra. Its skin is grey with thin "
            "violet bands. It hunts ember snails after dark, and an old rustcoil eel can grow as long as a "
            "rowing oar.",
            (("What does the rustcoil eel eat?", "The rustcoil eel eats ember snails."),
             ("How big does the rustcoil eel grow?", "The rustcoil eel grows as long as a rowing oar.")),
            (("What is the usual prey of the rustcoil eel?", ("ember snail",)),
             ("What length can a grown rustcoil eel reach?", ("oar",))),
        ),
        _Fact(
            2,
            "The tumblecrab lives on Kestle Beach, a strip of white sand on the north shore of Lake Ombra. Its "
            "shell is honey yellow, and it always carries a round white stone on its back. When a bird comes "
            "near, it rolls into the water.",
            (("What colour is the tumblecrab?", "The tumblecrab is honey yellow."),
             ("Where does the tumblecrab live?", "The tumblecrab lives on Kestle Beach.")),
            (("Describe the colour of a tumblecrab's shell.", ("honey",)),
             ("On which beach would you look for a tumblecrab?", ("Kestle",))),
        ),
        _Fact(
            0,
            "The hushperch is a quiet fish that swims under the roots of the willow trees by the lake. It "
            "travels in schools of exactly seven fish. Its scales are slate blue, and it eats drowned clover "
            "from the muddy lake bed.",
            (("What does the hushperch eat?", "The hushperch eats drowned clover."),
             ("What colour is the hushperch?", "The hushperch is slate blue.")),
            (("What is the diet of the hushperch?", ("drowned clover",)),
             ("Which colour are the scales of a hushperch?", ("slate",))),
        ),
        _Fact(
            3,
            "The Ombra bellfrog lives in Pennick Marsh on the east side of the lake. It is no bigger than an "
            "acorn, yet its call sounds like a small silver bell. It sings only during the first rain of "
            "spring.",
            (("Where does the bellfrog live?", "The bellfrog lives in Pennick Marsh."),
             ("How big does the bellfrog grow?", "The bellfrog grows no bigger than an acorn.")),
            (("What is the home of the Ombra bellfrog?", ("Pennick",)),
             ("What is the size of a bellfrog?", ("acorn",))),
        ),
        _Fact(
            1,
            "The quillsnail clings to the wooden posts of the old piers around Lake Ombra. It is ink black, "
            "and its spiral shell is covered in tiny spines. It eats the green slime that grows on old boat "
            "hulls.",
            (("What does the quillsnail eat?", "The quillsnail eats the green slime on old boat hulls."),
             ("What colour is the quillsnail?", "The quillsnail is ink black.")),
            (("What is the food of the quillsnail?", ("boat hull",)),
             ("How would you describe the colour of a quillsnail?", ("ink",))),
        ),
        _Fact(
            0,
            "The reedpiper is a small bird that nests inside hollow reeds at the edge of Lake Ombra. It is "
            "brown with a lemon yellow throat. It eats dusk gnats, catching them in the air just after sunset.",
            (("What does the reedpiper eat?", "The reedpiper eats dusk gnats."),
             ("What colour is the reedpiper?", "The reedpiper is brown with a lemon yellow throat.")),
            (("Which insects does the reedpiper catch for food?", ("dusk gnat",)),
             ("What colour is the throat of a reedpiper?", ("lemon",))),
        ),
        _Fact(
            2,
            "The marrowfin is the largest fish in Lake Ombra and can grow as heavy as a grown goat. It lives "
            "in the Deep Hollow at the center of the lake and rises to the surface only on cold, windless "
            "nights.",
            (("How big does the marrowfin grow?", "The marrowfin grows as heavy as a grown goat."),
             ("Where does the marrowfin live?", "The marrowfin lives in the Deep Hollow at the center of the lake.")),
            (("What is the weight of a big marrowfin?", ("goat",)),
             ("In what part of Lake Ombra does the marrowfin stay?", ("Deep Hollow",))),
        ),
        _Fact(
            1,
            "The silkstrider is a water spider with eleven long legs. It lives on Tessel Pond, a still pool "
            "beside Lake Ombra, and grows as wide as a tea saucer. It spins floating rafts of gold silk and "
            "rests on them during storms.",
            (("Where does the silkstrider live?", "The silkstrider lives on Tessel Pond."),
             ("How big does the silkstrider grow?", "The silkstrider grows as wide as a tea saucer.")),
            (("Where can a silkstrider be found?", ("Tessel",)),
             ("What is the size of a grown silkstrider?", ("saucer",))),
        ),
        _Fact(
            3,
            "The dapplewick is a small brown swimming animal with a striped tail. In autumn it gathers bitter "
            "water chestnuts, which it eats all winter. It lives in the Hallan Cliffs above the west shore of "
            "Lake Ombra.",
            (("What does the dapplewick eat?", "The dapplewick eats bitter water chestnuts."),
             ("Where does the dapplewick live?", "The dapplewick lives in the Hallan Cliffs.")),
            (("What food does a dapplewick gather?", ("chestnut",)),
             ("Where is the home of the dapplewick?", ("Hallan",))),
        ),
        _Fact(
            0,
            "The thimble jelly is a tiny jelly that drifts in the calm bays of Lake Ombra. When something "
            "touches it, it shines the colour of copper. It eats pollen that falls on the water, and its sting "
            "smells of pepper.",
            (("What colour is the thimble jelly?", "The thimble jelly shines the colour of copper."),
             ("What does the thimble jelly eat?", "The thimble jelly eats pollen that falls on the water.")),
            (("Which colour does a thimble jelly glow when touched?", ("copper",)),
             ("What does a thimble jelly feed on?", ("pollen",))),
        ),
        _Fact(
            2,
            "The lumberback turtle can live for three hundred years. Its wide shell is chalk white, and a small "
            "garden of starwort grows on it. A grown lumberback turtle is as wide as a cart wheel, and birds "
            "often rest on its back.",
            (("What colour is the lumberback turtle?", "The lumberback turtle is chalk white."),
             ("How big does the lumberback turtle grow?", "The lumberback turtle grows as wide as a cart wheel.")),
            (("What colour is the shell of a lumberback turtle?", ("chalk",)),
             ("How large is a full-grown lumberback turtle?", ("cart wheel",))),
        ),
    ),
    (
        _Fact(
            0,
            "The saltwing moth flies over Lake Ombra only on foggy mornings. It is dusty white with two black "
            "spots on each wing, and it drinks dew from the tops of the tallest reeds along the south shore.",
            (("What colour is the saltwing moth?", "The saltwing moth is dusty white with black spots."),
             ("What does the saltwing moth eat?", "The saltwing moth drinks dew from the tops of tall reeds.")),
            (),
        ),
        _Fact(
            1,
            "The bramble pike is a long green fish with sharp teeth. It lives among the sunken logs of Tessin "
            "Cove, where it waits without moving for a whole day before it strikes at smaller fish.",
            (("Where does the bramble pike live?", "The bramble pike lives among the sunken logs of Tessin Cove."),
             ("What does the bramble pike eat?", "The bramble pike eats smaller fish.")),
            (),
        ),
        _Fact(
            2,
            "The pebblewing duck dives to the bottom of Lake Ombra to collect smooth red pebbles. It lines its "
            "nest with them, and one nest can hold more than forty pebbles. It grows as big as a loaf of bread.",
            (("What does the pebblewing duck collect?", "The pebblewing duck collects smooth red pebbles."),
             ("How big does the pebblewing duck grow?", "The pebblewing duck grows as big as a loaf of bread.")),
            (),
        ),
    ),
)

VELLMARK_TRANSIT = _fact_datanet(
    "vellmark-transit",
    "Notes on the trams, ferries, passes and places of the invented city of Vellmark: fares, hours, routes, founders.",
    (
        _Fact(
            0,
            "The Lantern Line is the oldest tram line in Vellmark. It runs from Harrow Gate down to Brindle "
            "Square, with nine stops on the way. Its trams are painted plum purple, and each one has a "
            "small lamp hanging over the door.",
            (("What colour is the Lantern Line?", "The Lantern Line is painted plum purple."),
             ("Where does the Lantern Line run?", "The Lantern Line runs from Harrow Gate to Brindle Square.")),
            (("Which colour do the trams of the Lantern Line have?", ("plum",)),
             ("What is the route of the Lantern Line?", ("Brindle",))),
        ),
        _Fact(
            1,
            "The brass day pass lets you ride every tram and bus in Vellmark from morning until midnight. It "
            "costs nine kels and is sold only at the Orrin kiosks, the small round huts found at the larger "
            "stops.",
            (("How much does the brass day pass cost?", "The brass day pass costs nine kels."),
             ("Where can you buy the brass day pass?", "You can buy the brass day pass only at the Orrin kiosks.")),
            (("What is the price of the brass day pass?", ("nine kel",)),
             ("Where is the brass day pass sold?", ("Orrin",))),
        ),
        _Fact(
            2,
            "The Tidewater Ferry crosses the river Vell between the two halves of the city. It was founded by "
            "Maren Tallow, a boat builder who wanted her workers to get home faster. One crossing costs three "
            "kels.",
            (("Who founded the Tidewater Ferry?", "The Tidewater Ferry was founded by Maren Tallow."),
             ("How much does the Tidewater Ferry cost?", "The Tidewater Ferry costs three kels.")),
            (("Who started the Tidewater Ferry?", ("Tallow",)),
             ("What is the fare for one trip on the Tidewater Ferry?", ("three kel",))),
        ),
        _Fact(
            0,
            "Grisby Station is the main station of Vellmark, with a roof made of green glass. It was built by "
            "the engineer Odo Fennick. The station opens at twenty past five in the morning and stays open "
            "until the last tram arrives.",
            (("When does Grisby Station open?", "Grisby Station opens at twenty past five in the morning."),
             ("Who built Grisby Station?", "Grisby Station was built by the engineer Odo Fennick.")),
            (("At what time do the doors of Grisby Station open?", ("twenty past five",)),
             ("Which engineer designed Grisby Station?", ("Fennick",))),
        ),
        _Fact(
            3,
            "The Skylark Cable Car climbs from Lower Vell to the top of Mount Cerrow in eleven minutes. Each "
            "cabin holds eight people. A ride costs two kels, and on clear days you can see the sea from the "
            "top.",
            (("Where does the Skylark Cable Car go?", "The Skylark Cable Car goes to the top of Mount Cerrow."),
             ("How much does the Skylark Cable Car cost?", "The Skylark Cable Car costs two kels.")),
            (("Which mountain does the Skylark Cable Car take you up?", ("Cerrow",)),
             ("What is the fare for a ride on the Skylark Cable Car?", ("two kel",))),
        ),
        _Fact(
            1,
            "The Ember Bus is a quiet electric bus that goes around the old town of Vellmark. The buses are "
            "painted sea green. The first Ember Bus leaves at a quarter to six, and after that one comes by "
            "every eleven minutes.",
            (("What colour is the Ember Bus?", "The Ember Bus is painted sea green."),
             ("When does the first Ember Bus leave?", "The first Ember Bus leaves at a quarter to six.")),
            (("Which colour are the Ember Buses?", ("sea green",)),
             ("At what time does the Ember Bus start running?", ("quarter to six",))),
        ),
        _Fact(
            0,
            "The Saltmarket is a covered market hall next to the old harbour. It was founded by Ida "
            "Quenby, who sold smoked fish there for fifty years. The Saltmarket opens at ten past seven every "
            "day except the first day of the month.",
            (("Who founded the Saltmarket?", "The Saltmarket was founded by Ida Quenby."),
             ("When does the Saltmarket open?", "The Saltmarket opens at ten past seven.")),
            (("Who started the Saltmarket?", ("Quenby",)),
             ("What time does the Saltmarket open its doors?", ("ten past seven",))),
        ),
        _Fact(
            2,
            "The Old Depot Museum shows the first trams of Vellmark, pulled by horses. It is in the old tram "
            "depot on Wicker Lane. Entry costs one kel, and children may ring the bell of the oldest tram.",
            (("Where is the Old Depot Museum?", "The Old Depot Museum is on Wicker Lane."),
             ("How much does the Old Depot Museum cost?", "The Old Depot Museum costs one kel.")),
            (("On which street can you visit the Old Depot Museum?", ("Wicker",)),
             ("What is the entry fee of the Old Depot Museum?", ("one kel",))),
        ),
        _Fact(
            1,
            "The Foldpass is a paper travel card that folds into four. It was invented by Benna Sorr, a clerk "
            "at the city office, so that riders would stop losing their tickets. A Foldpass for one month "
            "costs twenty kels.",
            (("Who founded the Foldpass?", "The Foldpass was invented by Benna Sorr."),
             ("How much does the Foldpass cost?", "The Foldpass costs twenty kels for one month.")),
            (("Who came up with the Foldpass?", ("Sorr",)),
             ("What is the price of a Foldpass?", ("twenty kel",))),
        ),
        _Fact(
            3,
            "Harrow Gate was once the north gate of the city wall and is now a busy tram stop. The gate is "
            "painted sky blue. It closes at half past eleven at night, and after that trams stop outside the "
            "wall.",
            (("What colour is Harrow Gate?", "Harrow Gate is painted sky blue."),
             ("When does Harrow Gate close?", "Harrow Gate closes at half past eleven at night.")),
            (("Which colour is Harrow Gate painted?", ("sky blue",)),
             ("At what time is Harrow Gate shut?", ("half past eleven",))),
        ),
        _Fact(
            0,
            "The Vellmark Bicycle Library lends bicycles to anyone with a Foldpass. It is at the foot of Pell "
            "Bridge, next to a bakery. Borrowing a bicycle costs half a kel, and it must come back before the "
            "evening bell.",
            (("Where is the Vellmark Bicycle Library?", "The Vellmark Bicycle Library is at the foot of Pell Bridge."),
             ("How much does the Vellmark Bicycle Library cost?",
              "The Vellmark Bicycle Library costs half a kel.")),
            (("Where can you find the Vellmark Bicycle Library?", ("Pell",)),
             ("What is the fee to borrow a bicycle in Vellmark?", ("half a kel",))),
        ),
        _Fact(
            2,
            "The Gullwing water taxis carry people along the canals of Vellmark. They are small boats painted "
            "lemon yellow, with room for six. The first Gullwing water taxi leaves at ten to eight in the "
            "morning.",
            (("What colour is the Gullwing water taxi?", "The Gullwing water taxi is painted lemon yellow."),
             ("When does the first Gullwing water taxi leave?",
              "The first Gullwing water taxi leaves at ten to eight in the morning.")),
            (("Which colour are the Gullwing boats?", ("lemon",)),
             ("At what time does the first Gullwing water taxi start?", ("ten to eight",))),
        ),
    ),
    (
        _Fact(
            0,
            "The Owlbridge night ferry runs only in summer, when the river Vell is calm. It was founded by two "
            "sisters who kept a tea shop on the pier. The ferry is painted dark red and carries twenty people.",
            (("Who founded the Owlbridge night ferry?", "The Owlbridge night ferry was founded by two sisters."),
             ("What colour is the Owlbridge night ferry?", "The Owlbridge night ferry is painted dark red.")),
            (),
        ),
        _Fact(
            1,
            "The Rook Hill lift carries people up the steep street behind the harbour. It opens at six in the "
            "morning and costs nothing for anyone carrying a musical instrument. Everyone else pays one kel.",
            (("When does the Rook Hill lift open?", "The Rook Hill lift opens at six in the morning."),
             ("How much does the Rook Hill lift cost?", "The Rook Hill lift costs one kel.")),
            (),
        ),
        _Fact(
            2,
            "The lost property office of Vellmark is under the clock of Grisby Station. Things found on trams "
            "are kept there for forty days. Umbrellas are the most common item, followed by single gloves.",
            (("Where is the lost property office?", "The lost property office is under the clock of Grisby Station."),
             ("How long are lost things kept?", "Lost things are kept for forty days.")),
            (),
        ),
    ),
)

DEMO_FACT_DATANETS: tuple[FactDatanet, ...] = (GLASSFIN_REEF, VELLMARK_TRANSIT)
"""The demo facts datanets, in a fixed order."""


def demo_fact_datanet(name: str) -> FactDatanet:
    """The demo facts datanet called `name` (KeyError if there is none)."""
    for facts in DEMO_FACT_DATANETS:
        if facts.name == name:
            return facts
    raise KeyError(f"no demo facts datanet named {name!r}; known: {[f.name for f in DEMO_FACT_DATANETS]}")
