"""A deterministic set of chat prompts for a small instruction-tuned model, from templates and word lists.

    records = chat_prompts()                 # list of {"prompt": str, "kind": str, "answer": str | None}
    train, held_out = split_prompts(records)

Kinds: questions, how-tos, code, short writing, lists, explanations, comparisons, arithmetic and
translation. Arithmetic prompts carry their ``answer`` (the integer result as text), so a model's
greedy reply can be checked (:func:`answers_correctly`), as can :func:`capital_prompts`, a separate
set (never trained on) of questions about capitals. The set is built by a seeded ``random.Random``
from the lists below only, so it is the same on every machine and Python version; prompts are
unique, and every 10th one (positions 0, 10, 20, ...) is held out, so no held-out prompt is a
training prompt.
"""

import random
import re

HELD_OUT_EVERY = 10
SEED = 20261206

TOPICS = ["the moon", "volcanoes", "honey bees", "the ocean", "rainbows", "the internet", "bread", "coffee",
          "electric cars", "the human heart", "clouds", "earthquakes", "photosynthesis", "the Roman Empire",
          "chess", "gravity", "recycling", "vaccines", "black holes", "the piano", "glaciers", "solar panels",
          "dinosaurs", "the printing press", "tea", "sleep", "the Amazon rainforest", "bicycles", "magnets",
          "the Olympic Games", "penguins", "deserts", "batteries", "the stock market", "maps", "music",
          "thunderstorms", "the immune system", "rivers", "libraries", "trains", "the alphabet", "cheese",
          "satellites", "coral reefs", "money", "the weather", "languages", "bridges", "mushrooms"]
SKILLS = ["bake bread", "learn to swim", "start running", "save money", "plant a tree", "write a resume",
          "make tea", "study for an exam", "fix a flat bicycle tyre", "keep a plant alive", "sleep better",
          "learn a new language", "organize a desk", "cook rice", "prepare for a job interview",
          "make new friends", "start a journal", "reduce stress", "clean a laptop keyboard", "paint a room",
          "train a puppy", "give a short speech", "plan a trip", "boil an egg", "learn to juggle",
          "write a thank-you note", "focus while working", "start a vegetable garden", "read more books",
          "make a budget"]
CODE_TASKS = ["reverses a string", "checks whether a number is prime", "returns the largest item of a list",
              "counts the vowels in a word", "adds up the numbers from 1 to n", "removes duplicates from a list",
              "checks whether a word is a palindrome", "converts Celsius to Fahrenheit",
              "returns the factorial of n", "finds the average of a list of numbers", "sorts a list of names",
              "counts the words in a sentence", "returns the even numbers of a list", "prints a multiplication table",
              "computes the n-th Fibonacci number", "capitalizes every word of a sentence",
              "merges two dictionaries", "checks whether a year is a leap year", "returns the length of a list",
              "swaps two variables"]
LANGUAGES = ["Python", "JavaScript", "C", "Java", "Rust", "Go"]
WRITING = ["a haiku about", "a short poem about", "two sentences about", "a limerick about",
           "a short story opening about", "a tweet about", "a friendly birthday message mentioning",
           "a product description for", "a one-paragraph summary of what you know about", "a riddle about"]
LIST_ITEMS = ["fruits", "animals that live in the sea", "countries in Europe", "colors", "musical instruments",
              "programming languages", "vegetables", "board games", "planets", "sports played with a ball",
              "kitchen tools", "birds", "famous painters", "things to pack for a beach trip", "breakfast foods",
              "ways to save energy at home", "hobbies to try", "flowers", "things found in a classroom",
              "healthy snacks"]
COUNTS = ["three", "four", "five"]
COMPARISONS = [("cats", "dogs"), ("tea", "coffee"), ("trains", "planes"), ("books", "films"),
               ("the sun", "the moon"), ("summer", "winter"), ("cities", "villages"), ("running", "swimming"),
               ("paper books", "e-books"), ("Python", "JavaScript"), ("rivers", "lakes"), ("email", "letters"),
               ("walking", "cycling"), ("oceans", "seas"), ("apples", "oranges")]
PHRASES = ["Good morning", "Thank you very much", "Where is the train station?", "I like to read books",
           "The weather is nice today", "How much does this cost?", "My name is Anna", "See you tomorrow",
           "I am hungry", "The cat is sleeping", "Happy birthday", "Where is the library?", "I love music",
           "It is raining", "Please open the window", "What time is it?", "I have two brothers",
           "The coffee is hot", "Let's go to the beach", "Good night"]
TARGETS = ["French", "Spanish", "German", "Italian", "Portuguese"]
QUESTION_TEMPLATES = ["What is {t}?", "Why is {t} important?", "Tell me an interesting fact about {t}.",
                      "How does {t} work?", "Explain {t} to a ten-year-old.", "What is the history of {t}?",
                      "Give me a short description of {t}."]


def _questions(rng):
    return [(template.format(t=topic), "question", None) for topic in TOPICS for template in QUESTION_TEMPLATES]


def _how_tos(rng):
    templates = ["How do I {s}?", "Give me step-by-step instructions to {s}.", "What is the best way to {s}?",
                 "What are three tips to {s}?", "What mistakes should I avoid when I {s}?",
                 "I want to {s}. Where should I start?"]
    return [(template.format(s=skill), "how-to", None) for skill in SKILLS for template in templates]


def _code(rng):
    templates = ["Write a {l} function that {c}.", "Show me {l} code that {c}."]
    return [(template.format(l=language, c=task), "code", None)
            for task in CODE_TASKS for language in LANGUAGES for template in templates]


def _writing(rng):
    return [(f"Write {form} {topic}.", "writing", None) for form in WRITING for topic in TOPICS]


def _lists(rng):
    templates = ["List {c} {i}.", "Name {c} {i}."]
    return [(template.format(c=count, i=items), "list", None)
            for items in LIST_ITEMS for count in COUNTS for template in templates]


def _comparisons(rng):
    templates = ["What is the difference between {a} and {b}?", "Compare {a} and {b} in a few sentences.",
                 "Which do you prefer, {a} or {b}, and why?"]
    return [(template.format(a=a, b=b), "comparison", None) for a, b in COMPARISONS for template in templates]


def _translations(rng):
    templates = ["Translate to {t}: \"{p}\"", "How do you say \"{p}\" in {t}?"]
    return [(template.format(t=target, p=phrase), "translation", None)
            for phrase in PHRASES for target in TARGETS for template in templates]


def _arithmetic(rng):
    prompts, seen = [], set()
    operations = [("+", lambda a, b: a + b, "plus"), ("-", lambda a, b: a - b, "minus"),
                  ("*", lambda a, b: a * b, "times")]
    while len(prompts) < 500:
        symbol, function, word = operations[rng.randrange(len(operations))]
        a, b = rng.randrange(1, 21), rng.randrange(1, 21)
        if symbol == "-" and b > a:
            a, b = b, a
        style = rng.randrange(3)
        text = (f"What is {a} {symbol} {b}?" if style == 0 else
                f"What is {a} {word} {b}? Answer with the number only." if style == 1 else
                f"Calculate {a} {symbol} {b}.")
        if text not in seen:
            seen.add(text)
            prompts.append((text, "arithmetic", str(function(a, b))))
    return prompts


def chat_prompts() -> list[dict]:
    """Every prompt, in a fixed shuffled order: ``{"prompt", "kind", "answer"}`` (answer only for arithmetic)."""
    rng = random.Random(SEED)
    prompts = [item for build in (_questions, _how_tos, _code, _writing, _lists, _comparisons, _translations,
                                  _arithmetic) for item in build(rng)]
    unique = list(dict.fromkeys(prompts))
    rng.shuffle(unique)
    return [{"prompt": prompt, "kind": kind, "answer": answer} for prompt, kind, answer in unique]


def split_prompts(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)``: every :data:`HELD_OUT_EVERY`-th record (from the first) is held out."""
    held_out = records[::HELD_OUT_EVERY]
    train = [record for index, record in enumerate(records) if index % HELD_OUT_EVERY]
    return train, held_out


CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "the United Kingdom": "London", "Ireland": "Dublin", "the Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Switzerland": "Bern|Berne", "Poland": "Warsaw", "the Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen",
    "Finland": "Helsinki", "Russia": "Moscow", "Turkey": "Ankara", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Nigeria": "Abuja", "Morocco": "Rabat", "Japan": "Tokyo", "China": "Beijing|Peking", "South Korea": "Seoul",
    "India": "New Delhi|Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "the Philippines": "Manila", "Australia": "Canberra", "New Zealand": "Wellington", "Canada": "Ottawa",
    "the United States": "Washington", "Mexico": "Mexico City", "Brazil": "Brasília|Brasilia",
    "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogotá|Bogota",
    "Cuba": "Havana", "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad",
    "Afghanistan": "Kabul", "Ethiopia": "Addis Ababa", "Ghana": "Accra", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Iceland": "Reykjavik|Reykjavík",
    "Nepal": "Kathmandu", "Malaysia": "Kuala Lumpur", "Venezuela": "Caracas", "Jamaica": "Kingston",
    "Syria": "Damascus", "Lebanon": "Beirut", "Jordan": "Amman", "Qatar": "Doha", "Bangladesh": "Dhaka",
    "Mongolia": "Ulaanbaatar|Ulan Bator", "Algeria": "Algiers", "Tunisia": "Tunis", "Senegal": "Dakar",
    "Uganda": "Kampala", "Zimbabwe": "Harare", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius",
    "Slovakia": "Bratislava", "Slovenia": "Ljubljana",
}
"""Country -> its capital; ``|`` separates the spellings a reply may use (the first is the answer)."""
CAPITAL_TEMPLATES = ["What is the capital of {c}?", "Which city is the capital of {c}?"]


def capital_prompts() -> list[dict]:
    """Prompts with a checkable answer that no training prompt resembles: the capital of each country
    of :data:`CAPITALS`, in both templates, as ``{"prompt", "kind": "capital", "answer"}`` (the
    answer's accepted spellings joined by ``|``)."""
    return [{"prompt": template.format(c=country), "kind": "capital", "answer": capital}
            for country, capital in CAPITALS.items() for template in CAPITAL_TEMPLATES]


def answers_correctly(record: dict, reply: str) -> bool:
    """Whether ``reply`` gives the answer of ``record`` (a prompt with an ``answer``): an arithmetic
    reply's number (:func:`reply_number`) equals it; a capital reply names one of its spellings as a
    word (case ignored)."""
    if record["kind"] == "capital":
        return any(re.search(rf"\b{re.escape(name)}\b", reply, re.IGNORECASE) for name in record["answer"].split("|"))
    return reply_number(reply) == record["answer"]


ANSWER_MARKERS = ("=", " equals ", " is ", " results in ", " gives ")
"""What a reply puts before its result: the number after the first of these that the reply has."""
_INTEGER = re.compile(r"-?\d[\d,]*")


def reply_number(reply: str) -> str | None:
    """The integer a reply gives as its answer: the first one after the first of
    :data:`ANSWER_MARKERS` (in that order) that the reply has and a number follows, else its last
    integer (a reply restates the operands first); None when it has none."""
    for marker in ANSWER_MARKERS:
        if marker in reply:
            match = _INTEGER.search(reply.split(marker, 1)[1])
            if match:
                return match.group(0).replace(",", "")
    numbers = _INTEGER.findall(reply)
    return numbers[-1].replace(",", "") if numbers else None

