"""The toy world: a seeded bilingual (English / Chinese) world of people, facts, arithmetic, counting and stories,
and the sentences the built-in corpus speaks about it.

People have a favourite colour, pet, food, home town, job, hobby and age; made-up countries have capitals; numbers are
written as words (seven / 七) so a transcript is unambiguous; stories have a right and a wrong ending
(``storycloze_items``). ``plan_texts`` draws dialogues (1-3 exchanges, follow-ups refer back) with every sentence
unique; ``write_text_corpus`` writes text-only documents of the same world for ``interleave`` and stage 3.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

# ======================================================================================================= toy world
# Parallel (English, Chinese) vocabularies: the world draws indices, so both languages describe the same facts.
NAMES = [("Tom", "小明", "m"), ("Anna", "小红", "f"), ("Max", "王伟", "m"), ("Lily", "李娜", "f"), ("Ben", "张强", "m"),
         ("Emma", "陈静", "f"), ("Jack", "刘洋", "m"), ("Mia", "赵敏", "f"), ("Leo", "黄磊", "m"), ("Zoe", "周婷", "f"),
         ("Sam", "吴刚", "m"), ("Nora", "徐丽", "f"), ("Oscar", "孙浩", "m"), ("Ruby", "马兰", "f"), ("Henry", "朱军", "m"),
         ("Grace", "胡月", "f"), ("Lucas", "郭涛", "m"), ("Chloe", "林雪", "f"), ("Adam", "何平", "m"), ("Ella", "高洁", "f"),
         ("Noah", "罗斌", "m"), ("Ivy", "郑爽", "f"), ("Felix", "梁宇", "m"), ("Alice", "宋佳", "f"), ("Peter", "唐亮", "m"),
         ("Rose", "韩梅", "f"), ("Hugo", "冯凯", "m"), ("Clara", "彭晴", "f"), ("Owen", "曹阳", "m"), ("Daisy", "谢芳", "f")]
COLOURS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("purple", "紫色"), ("white", "白色"),
           ("black", "黑色"), ("pink", "粉色"), ("orange", "橙色"), ("grey", "灰色"), ("brown", "棕色")]
# (singular, plural, Chinese, measure word)
PETS = [("dog", "dogs", "小狗", "只"), ("cat", "cats", "小猫", "只"), ("rabbit", "rabbits", "兔子", "只"),
        ("bird", "birds", "小鸟", "只"), ("goldfish", "goldfish", "金鱼", "条"), ("turtle", "turtles", "乌龟", "只"),
        ("horse", "horses", "马", "匹"), ("duck", "ducks", "鸭子", "只"), ("hamster", "hamsters", "仓鼠", "只"),
        ("parrot", "parrots", "鹦鹉", "只"), ("frog", "frogs", "青蛙", "只"), ("goat", "goats", "山羊", "只"),
        ("pig", "pigs", "小猪", "头"), ("mouse", "mice", "老鼠", "只")]
FOODS = [("noodles", "面条"), ("rice", "米饭"), ("dumplings", "饺子"), ("apples", "苹果"), ("bananas", "香蕉"),
         ("bread", "面包"), ("soup", "汤"), ("cake", "蛋糕"), ("eggs", "鸡蛋"), ("grapes", "葡萄"), ("watermelon", "西瓜"),
         ("tofu", "豆腐"), ("pizza", "披萨"), ("cheese", "奶酪"), ("carrots", "胡萝卜"), ("potatoes", "土豆"),
         ("cookies", "饼干"), ("oranges", "橙子")]
JOBS = [("teacher", "老师"), ("doctor", "医生"), ("driver", "司机"), ("cook", "厨师"), ("painter", "画家"),
        ("farmer", "农民"), ("police officer", "警察"), ("singer", "歌手"), ("nurse", "护士"), ("pilot", "飞行员"),
        ("baker", "面包师"), ("writer", "作家"), ("engineer", "工程师")]
HOBBIES = [("swimming", "游泳"), ("reading books", "看书"), ("singing", "唱歌"), ("dancing", "跳舞"), ("drawing", "画画"),
           ("running", "跑步"), ("fishing", "钓鱼"), ("cooking", "做饭"), ("playing chess", "下棋"),
           ("climbing hills", "爬山"), ("playing football", "踢足球"), ("riding a bike", "骑自行车")]
COUNTRIES = [("Zorland", "云海国"), ("Mirania", "金山国"), ("Brevia", "月光国"), ("Kelvonia", "雪松国"),
             ("Tarsia", "青石国"), ("Olmeria", "风铃国"), ("Vandoria", "星河国"), ("Quorra", "红叶国"),
             ("Pellas", "白沙国"), ("Dunavia", "花果国")]
CAPITALS = [("Ostrav", "清水城"), ("Lumen", "明珠城"), ("Carvel", "长风城"), ("Dunmore", "玉泉城"), ("Bellport", "桃园城"),
            ("Redwick", "石门城"), ("Stonebay", "银湖城"), ("Ashford", "松林城"), ("Greenhill", "春江城"),
            ("Silverton", "北斗城")]
ATTRIBUTES = ("colour", "pet", "food", "city", "job", "hobby", "age")

_EN_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
            "seventeen eighteen nineteen").split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ZH_DIGITS = "零一二三四五六七八九"


def number_words(n: int, language: str, *, count: bool = False) -> str:
    """0-99 as words: ``"twenty one"`` / ``"二十一"``; with `count`, Chinese 2 is 两 (两只猫, but 一加二)."""
    if not 0 <= n <= 99:
        raise ValueError(f"number_words: {n} is outside 0..99")
    if language == "en":
        return _EN_ONES[n] if n < 20 else _EN_TENS[n // 10] + ("" if n % 10 == 0 else " " + _EN_ONES[n % 10])
    if count and n == 2:
        return "两"
    if n < 10:
        return _ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    return ("" if tens == 1 else _ZH_DIGITS[tens]) + "十" + ("" if ones == 0 else _ZH_DIGITS[ones])


@dataclass(frozen=True)
class Person:
    index: int
    gender: str
    colour: int
    pet: int
    food: int
    city: int
    job: int
    hobby: int
    age: int


class ToyWorld:
    """The facts a seed fixes: each person's attributes and which capital belongs to which country."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(f"toy-world-{seed}")
        self.capital_of = rng.sample(range(len(CAPITALS)), len(COUNTRIES))
        self.people = [Person(i, g, rng.randrange(len(COLOURS)), rng.randrange(len(PETS)), rng.randrange(len(FOODS)),
                              rng.randrange(len(CAPITALS)), rng.randrange(len(JOBS)), rng.randrange(len(HOBBIES)),
                              rng.randint(6, 15)) for i, (_, _, g) in enumerate(NAMES)]

    def value(self, p: Person, attr: str, lang: str) -> str:
        """The attribute as it is spoken in an answer ("a dog" / "一只小狗")."""
        en = lang == "en"
        if attr == "pet":
            s, _, zh, m = PETS[p.pet]
            return _article(s) if en else f"一{m}{zh}"
        if attr == "job":
            return _article(JOBS[p.job][0]) if en else JOBS[p.job][1]
        if attr == "age":
            return number_words(p.age, lang)
        table = {"colour": COLOURS, "food": FOODS, "city": CAPITALS, "hobby": HOBBIES}[attr]
        return table[getattr(p, attr)][0 if en else 1]


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _pronouns(p: Person, lang: str) -> dict[str, str]:
    if lang == "zh":
        t = "他" if p.gender == "m" else "她"
        return {"pron": t, "Pron": t, "obj": t, "poss": t + "的", "Poss": t + "的"}
    s, o, ps = ("he", "him", "his") if p.gender == "m" else ("she", "her", "her")
    return {"pron": s, "Pron": s.capitalize(), "obj": o, "poss": ps, "Poss": ps.capitalize()}


# Templates: {name} is the person; {v} the attribute value; {pron}/{poss}/... pronouns (see _pronouns).
FACT_Q = {"en": {"colour": ["What is {name}'s favourite colour?", "Which colour does {name} like best?",
                            "Do you know {name}'s favourite colour?"],
                 "pet": ["What pet does {name} have?", "Which animal lives with {name}?", "Does {name} have a pet?"],
                 "food": ["What does {name} like to eat?", "What is {name}'s favourite food?",
                          "Which food does {name} love?"],
                 "city": ["Where does {name} live?", "Which city is {name} from?", "In which town does {name} live?"],
                 "job": ["What does {name} do for work?", "What is {name}'s job?", "What job does {name} have?"],
                 "hobby": ["What does {name} like to do?", "What is {name}'s hobby?",
                           "How does {name} spend free time?"],
                 "age": ["How old is {name} this year?", "Do you know how old {name} is?",
                         "Can you tell me how old {name} is?"]},
          "zh": {"colour": ["{name}最喜欢什么颜色？", "{name}喜欢哪种颜色？", "你知道{name}最喜欢的颜色吗？"],
                 "pet": ["{name}养了什么宠物？", "{name}家里有什么动物？", "{name}有宠物吗？"],
                 "food": ["{name}喜欢吃什么？", "{name}最爱吃的东西是什么？", "{name}平时爱吃什么？"],
                 "city": ["{name}住在哪里？", "{name}是哪个城市的人？", "{name}的家在哪儿？"],
                 "job": ["{name}做什么工作？", "{name}的工作是什么？", "{name}是干什么的？"],
                 "hobby": ["{name}喜欢做什么？", "{name}有什么爱好？", "{name}空闲时喜欢干什么？"],
                 "age": ["{name}几岁了？", "{name}今年多大？", "你知道{name}多大了吗？"]}}
FACT_A = {"en": {"colour": ["{name}'s favourite colour is {v}.", "{name} likes {v} best.",
                            "The colour {name} likes best is {v}."],
                 "pet": ["{name} has {v}.", "{name} lives with {v}.", "{name} keeps {v} at home."],
                 "food": ["{name} likes to eat {v}.", "{name}'s favourite food is {v}.", "{name} loves {v} very much."],
                 "city": ["{name} lives in {v}.", "{name} comes from {v}.", "{name}'s home is in {v}."],
                 "job": ["{name} works as {v}.", "{name} is {v}.", "{name} has a job as {v}."],
                 "hobby": ["{name} likes {v}.", "{name}'s hobby is {v}.", "In free time, {name} enjoys {v}."],
                 "age": ["{name} is {v} years old.", "{name} is {v} this year.", "{name}'s age is {v}."]},
          "zh": {"colour": ["{name}最喜欢{v}。", "{name}喜欢的颜色是{v}。", "{name}最爱{v}。"],
                 "pet": ["{name}养了{v}。", "{name}家里有{v}。", "{name}的宠物是{v}。"],
                 "food": ["{name}喜欢吃{v}。", "{name}最爱吃{v}。", "{name}平时爱吃{v}。"],
                 "city": ["{name}住在{v}。", "{name}是{v}人。", "{name}的家在{v}。"],
                 "job": ["{name}是一名{v}。", "{name}的工作是{v}。", "{name}当{v}。"],
                 "hobby": ["{name}喜欢{v}。", "{name}的爱好是{v}。", "{name}空闲时爱{v}。"],
                 "age": ["{name}今年{v}岁。", "{name}{v}岁了。", "{name}的年龄是{v}岁。"]}}
# Follow-ups name nobody: they only make sense with the previous turn (history reference).
FOLLOW_Q = {"en": {"colour": ["And what colour does {pron} like?", "Which colour does {pron} like best?"],
                   "pet": ["Does {pron} have a pet too?", "And what pet does {pron} have?"],
                   "food": ["What does {pron} like to eat?", "And what is {poss} favourite food?"],
                   "city": ["And where does {pron} live?", "Which city is {pron} from?"],
                   "job": ["What is {poss} job?", "And what does {pron} do for work?"],
                   "hobby": ["What does {pron} do for fun?", "And what is {poss} hobby?"],
                   "age": ["And how old is {pron}?", "How old is {pron} now?"]},
            "zh": {"colour": ["那{pron}喜欢什么颜色？", "{pron}最喜欢哪种颜色？"],
                   "pet": ["那{pron}养了什么宠物？", "{pron}家里有动物吗？"],
                   "food": ["那{pron}爱吃什么？", "{pron}最喜欢吃什么？"],
                   "city": ["那{pron}住在哪里？", "{pron}的家在哪儿？"],
                   "job": ["那{pron}做什么工作？", "{pron}是干什么的？"],
                   "hobby": ["那{pron}有什么爱好？", "{pron}平时喜欢做什么？"],
                   "age": ["那{pron}几岁了？", "{pron}今年多大？"]}}
PREFIX = {"en": ["", "Okay. ", "Thanks. ", "I see. ", "Great. ", "Nice. ", "Got it. ", "Interesting. "],
          "zh": ["", "好的，", "谢谢，", "明白了，", "不错，", "真好，", "有意思，", "知道了，"]}
MATH_Q = {"en": {"+": ["What is {a} plus {b}?", "How much is {a} plus {b}?", "Can you add {a} and {b}?"],
                 "-": ["What is {a} minus {b}?", "How much is {a} take away {b}?",
                       "What do you get if you subtract {b} from {a}?"],
                 "*": ["What is {a} times {b}?", "How much is {a} times {b}?",
                       "What do you get if you multiply {a} by {b}?"]},
          "zh": {"+": ["{a}加{b}等于多少？", "{a}加{b}是多少？", "请算一下{a}加{b}。"],
                 "-": ["{a}减{b}等于多少？", "{a}减去{b}是多少？", "请算一下{a}减{b}。"],
                 "*": ["{a}乘{b}等于多少？", "{a}乘以{b}是多少？", "请算一下{a}乘{b}。"]}}
MATH_A = {"en": {"+": ["{a} plus {b} is {c}.", "{a} plus {b} equals {c}.", "If you add {a} and {b}, you get {c}."],
                 "-": ["{a} minus {b} is {c}.", "{a} minus {b} equals {c}.", "If you take {b} from {a}, you get {c}."],
                 "*": ["{a} times {b} is {c}.", "{a} times {b} equals {c}.", "If you multiply {a} by {b}, you get {c}."]},
          "zh": {"+": ["{a}加{b}等于{c}。", "{a}加{b}的结果是{c}。", "{a}加上{b}得{c}。"],
                 "-": ["{a}减{b}等于{c}。", "{a}减{b}的结果是{c}。", "{a}减去{b}得{c}。"],
                 "*": ["{a}乘{b}等于{c}。", "{a}乘{b}的结果是{c}。", "{a}乘以{b}得{c}。"]}}
MATH_FOLLOW_Q = {"en": {"+": ["Now add {b} to that.", "And if you add {b} more?", "What if we add {b}?"],
                        "-": ["Now take away {b}.", "And if you subtract {b}?", "What if we take away {b}?"]},
                 "zh": {"+": ["再加{b}呢？", "那再加上{b}是多少？", "如果再加{b}呢？"],
                        "-": ["再减{b}呢？", "那再减去{b}是多少？", "如果再减{b}呢？"]}}
COUNT_Q = {"en": {1: ["Can you count from {a} to {b}?", "Please count from {a} to {b}.", "Count from {a} up to {b}, please."],
                  -1: ["Can you count backwards from {b} to {a}?", "Please count down from {b} to {a}."]},
           "zh": {1: ["请从{a}数到{b}。", "你能从{a}数到{b}吗？", "从{a}开始数到{b}吧。"],
                  -1: ["请从{b}倒着数到{a}。", "你能从{b}倒数到{a}吗？"]}}
COUNT_A = {"en": ["{seq}.", "Sure: {seq}.", "Here we go: {seq}."], "zh": ["{seq}。", "好的：{seq}。", "我来数：{seq}。"]}
ANIMALS_Q = {"en": ["{name} has {a} {x} and {b} {y}. How many animals is that?",
                    "If {name} has {a} {x} and {b} {y}, how many animals are there?"],
             "zh": ["{name}有{a}{mx}{x}和{b}{my}{y}，一共有几只动物？", "如果{name}有{a}{mx}{x}和{b}{my}{y}，一共有多少只动物？"]}
ANIMALS_A = {"en": ["{name} has {c} animals in total.", "That makes {c} animals for {name}."],
             "zh": ["{name}一共有{c}只动物。", "{name}总共有{c}只动物。"]}
CAPITAL_Q = {"en": ["What is the capital of {country}?", "Which city is the capital of {country}?",
                    "Do you know the capital of {country}?", "Which country has {capital} as its capital?",
                    "{capital} is the capital of which country?"],
             "zh": ["{country}的首都是哪里？", "{country}的首都是哪座城市？", "你知道{country}的首都吗？",
                    "{capital}是哪个国家的首都？", "哪个国家的首都是{capital}？"]}
CAPITAL_A = {"en": ["The capital of {country} is {capital}.", "{capital} is the capital of {country}.",
                    "The capital city of {country} is {capital}."],
             "zh": ["{country}的首都是{capital}。", "{capital}是{country}的首都。", "{country}的首都叫{capital}。"]}
# Stories: (setup, right ending, wrong ending). In the endings {Pron}/{poss}... are pronouns when they follow the
# setup, and the person's name when an ending stands alone as an answer ("What happened next?").
STORIES = {"en": [
    ("{name} was very hungry after school.", "{Pron} ate a big bowl of {food}.",
     "{Pron} said {pron} was too full to eat anything."),
    ("It started to rain while {name} was walking home.", "{Pron} opened an umbrella and walked faster.",
     "{Pron} put on sunglasses because the sun was so bright."),
    ("{name} played outside all day and felt very tired.", "That night {pron} went to bed early.",
     "That night {pron} had too much energy to sleep."),
    ("{name}'s {pet} did not want to eat today.", "{Pron} took the {pet} to the animal doctor.",
     "{Pron} was glad the {pet} was so hungry."),
    ("Today is {name}'s birthday.", "{Poss} friends brought a cake and sang a happy song.",
     "{Pron} said it was the saddest day and went home alone."),
    ("It was snowing, and {name} had to go out.", "{Pron} put on a warm coat and a hat.",
     "{Pron} went out in shorts and a thin shirt."),
    ("{name} could not find the house key.", "{Pron} looked under the bed and found it.",
     "{Pron} bought a new house the same day."),
    ("{name} was thirsty after a long run.", "{Pron} drank a big glass of cold water.", "{Pron} ate a spoon of dry salt."),
    ("{name} has a big test tomorrow.", "So {pron} studied hard all evening.",
     "So {pron} threw all {poss} books into the river."),
    ("{name} woke up late and the bus was about to leave.", "{Pron} ran as fast as {pron} could to catch it.",
     "{Pron} went back to bed for three more hours."),
    ("{name} planted some seeds in the garden.", "After a few weeks, {poss} seeds grew into small green plants.",
     "After a few weeks, {poss} seeds turned into little fish."),
    ("A friend from {city} came to visit {name}.", "{Pron} made tea, and they talked for hours.",
     "{Pron} locked the door and hid under the table."),
    ("{name} saw an old man drop his bag.", "{Pron} picked it up and gave it back to him.",
     "{Pron} laughed and kicked the bag away."),
    ("{name} wanted to buy some {food} at the market.", "{Pron} paid the seller and carried it home.",
     "{Pron} paid with leaves and flew home on a cloud."),
    ("The lights went out at {name}'s house.", "{Pron} found a candle and lit it.",
     "{Pron} turned on the television to watch a film."),
    ("{name} dropped a glass on the kitchen floor.", "{Pron} carefully swept up the broken pieces.",
     "{Pron} walked on the broken pieces with bare feet.")], "zh": [
    ("{name}放学后很饿。", "{Pron}吃了一大碗{food}。", "{Pron}说自己太饱了，什么都不想吃。"),
    ("{name}走路回家的时候下起了雨。", "{Pron}打开雨伞，走得更快了。", "{Pron}戴上墨镜，因为太阳太亮了。"),
    ("{name}在外面玩了一整天，觉得很累。", "那天晚上{pron}很早就睡了。", "那天晚上{pron}精神太好，一直睡不着。"),
    ("{name}的{pet}今天不想吃东西。", "{Pron}带{pet}去看了动物医生。", "{Pron}很高兴{pet}这么饿。"),
    ("今天是{name}的生日。", "{Poss}朋友们带来了蛋糕，一起唱了生日歌。", "{Pron}说这是最难过的一天，一个人回家了。"),
    ("外面下着大雪，{name}要出门。", "{Pron}穿上了厚外套，戴上了帽子。", "{Pron}只穿了短裤和一件薄衬衫就出去了。"),
    ("{name}找不到家里的钥匙了。", "{Pron}在床底下找到了钥匙。", "{Pron}当天就买了一座新房子。"),
    ("{name}跑完步以后很渴。", "{Pron}喝了一大杯凉水。", "{Pron}吃了一勺干盐。"),
    ("{name}明天有一个大考试。", "所以{pron}整个晚上都在认真复习。", "所以{pron}把所有的书都扔进了河里。"),
    ("{name}起晚了，公交车马上就要开了。", "{Pron}拼命跑去赶车。", "{Pron}又回到床上睡了三个小时。"),
    ("{name}在花园里种了种子。", "几周以后，{poss}种子长出了小苗。", "几周以后，{poss}种子变成了小鱼。"),
    ("一个来自{city}的朋友来看{name}。", "{Pron}泡了茶，两个人聊了好几个小时。", "{Pron}锁上门，躲到了桌子下面。"),
    ("{name}看见一位老爷爷的包掉了。", "{Pron}捡起包，还给了老爷爷。", "{Pron}笑着把包踢走了。"),
    ("{name}想去市场买一些{food}。", "{Pron}付了钱，把东西带回了家。", "{Pron}用树叶付钱，坐着云朵飞回了家。"),
    ("{name}家里突然停电了。", "{Pron}找到一根蜡烛点上了。", "{Pron}打开电视看了一部电影。"),
    ("{name}把一个杯子掉在了厨房地上。", "{Pron}小心地把碎片扫干净了。", "{Pron}光着脚在碎片上走来走去。")]}
STORY_Q = {"en": ["Tell me a short story about {name}.", "Can you tell me a story about {name}?",
                  "{setup} What happened next?", "{setup} What did {pron} do then?"],
           "zh": ["给我讲一个关于{name}的小故事。", "你能讲一个{name}的故事吗？", "{setup}后来怎么样了？",
                  "{setup}接下来{pron}做了什么？"]}
INTRO = {"en": "{name} is {job} who lives in {city}.", "zh": "{name}是一名{job}，住在{city}。"}


def _fill(template: str, lang: str, **kw: str) -> str:
    text = template.format(**kw)
    return text[0].upper() + text[1:] if lang == "en" else text


def _story_parts(world: ToyWorld, p: Person, k: int, lang: str, rng: random.Random) -> dict[str, str]:
    en = lang == "en"
    city = CAPITALS[rng.choice([c for c in range(len(CAPITALS)) if c != p.city])][0 if en else 1]
    kw = {"name": NAMES[p.index][0 if en else 1], "food": FOODS[p.food][0 if en else 1],
          "pet": PETS[p.pet][0 if en else 2], "city": city}
    setup, right, wrong = STORIES[lang][k]
    return {"setup": setup.format(**kw), **{f"{which}_{mode}": _ending(tpl, p, lang, kw, mode)
                                            for which, tpl in (("right", right), ("wrong", wrong))
                                            for mode in ("story", "alone")}}


def _ending(template: str, p: Person, lang: str, kw: dict, mode: str) -> str:
    """An ending after its setup uses pronouns; standing alone, its first pronoun becomes the person's name."""
    if mode == "alone":
        name = kw["name"]
        template = re.sub(r"\{(Pron|pron|Poss|poss)\}",
                          lambda m: name + ("'s" if lang == "en" else "的") if "oss" in m.group(1) else name,
                          template, count=1)
    return _fill(template, lang, **kw, **_pronouns(p, lang))


def storycloze_items(seed: int, n: int, language: str) -> list[dict]:
    """`n` distinct stories from the toy world of `seed`: ``{"context", "right", "wrong"}`` (story-cloze evaluation)."""
    if language not in ("en", "zh"):
        raise ValueError(f"storycloze_items: language must be 'en' or 'zh', got {language!r}")
    world, rng = ToyWorld(seed), random.Random(f"storycloze-{seed}-{language}")
    pairs = [(p, k) for p in world.people for k in range(len(STORIES[language]))]
    if n > len(pairs):
        raise ValueError(f"storycloze_items: the toy world has only {len(pairs)} stories per language, asked for {n}")
    items = []
    for p, k in rng.sample(pairs, n):
        parts = _story_parts(world, p, k, language, rng)
        intro = INTRO[language].format(name=NAMES[p.index][0 if language == "en" else 1],
                                       job=world.value(p, "job", language), city=world.value(p, "city", language))
        items.append({"context": f"{intro}{' ' if language == 'en' else ''}{parts['setup']}",
                      "right": parts["right_story"], "wrong": parts["wrong_story"]})
    return items


# ---------------------------------------------------------------------------------------------- exchanges & plans
# Each generator draws one (question, answer) pair and the context a follow-up may refer to.
def _gen_fact(world, lang, rng, ctx):
    p, attr = rng.choice(world.people), rng.choice(ATTRIBUTES)
    name = NAMES[p.index][0 if lang == "en" else 1]
    q = _fill(rng.choice(FACT_Q[lang][attr]), lang, name=name)
    return q, _fill(rng.choice(FACT_A[lang][attr]), lang, name=name, v=world.value(p, attr, lang)), {"person": p}


def _gen_fact_follow(world, lang, rng, ctx):
    p, attr = ctx["person"], rng.choice(ATTRIBUTES)
    q = rng.choice(PREFIX[lang]) + _fill(rng.choice(FOLLOW_Q[lang][attr]), lang, **_pronouns(p, lang))
    name = NAMES[p.index][0 if lang == "en" else 1]
    return q, _fill(rng.choice(FACT_A[lang][attr]), lang, name=name, v=world.value(p, attr, lang)), {"person": p}


def _math_answer(lang, rng, op, a, b):
    c = {"+": a + b, "-": a - b, "*": a * b}[op]
    words = {k: number_words(v, lang) for k, v in (("a", a), ("b", b), ("c", c))}
    return _fill(rng.choice(MATH_A[lang][op]), lang, **words), words, c


def _gen_math(world, lang, rng, ctx):
    op = rng.choice("+-*")
    a, b = ((rng.randint(0, 12), rng.randint(0, 12)) if op == "+" else
            (lambda x: (x, rng.randint(0, x)))(rng.randint(1, 20)) if op == "-" else (rng.randint(2, 9), rng.randint(2, 9)))
    answer, words, c = _math_answer(lang, rng, op, a, b)
    return _fill(rng.choice(MATH_Q[lang][op]), lang, **words), answer, {"value": c}


def _gen_math_follow(world, lang, rng, ctx):
    a = ctx["value"]
    op = "-" if a >= 30 or (a >= 2 and rng.random() < 0.5) else "+"
    b = rng.randint(1, min(9, a)) if op == "-" else rng.randint(1, 9)
    answer, words, c = _math_answer(lang, rng, op, a, b)
    return rng.choice(PREFIX[lang]) + _fill(rng.choice(MATH_FOLLOW_Q[lang][op]), lang, b=words["b"]), answer, {"value": c}


def _gen_count(world, lang, rng, ctx):
    a = rng.randint(0, 15)
    b, step = a + rng.randint(3, 5), rng.choice((1, -1))
    seq = [number_words(i, lang) for i in range(a, b + 1)][::step]
    q = _fill(rng.choice(COUNT_Q[lang][step]), lang, a=number_words(a, lang), b=number_words(b, lang))
    return q, _fill(rng.choice(COUNT_A[lang]), lang, seq=(", " if lang == "en" else "，").join(seq)), {}


def _gen_animals(world, lang, rng, ctx):
    p, (x, y) = rng.choice(world.people), rng.sample(range(len(PETS)), 2)
    a, b = rng.randint(2, 6), rng.randint(2, 6)
    en = lang == "en"
    kw = {"name": NAMES[p.index][0 if en else 1], "a": number_words(a, lang, count=True),
          "b": number_words(b, lang, count=True), "x": PETS[x][1 if en else 2], "y": PETS[y][1 if en else 2],
          "mx": PETS[x][3], "my": PETS[y][3]}
    q = _fill(rng.choice(ANIMALS_Q[lang]), lang, **kw)
    return q, _fill(rng.choice(ANIMALS_A[lang]), lang, name=kw["name"], c=number_words(a + b, lang)), {"person": p}


def _gen_capital(world, lang, rng, ctx):
    k = rng.randrange(len(COUNTRIES))
    kw = {"country": COUNTRIES[k][lang == "zh"], "capital": CAPITALS[world.capital_of[k]][lang == "zh"]}
    return _fill(rng.choice(CAPITAL_Q[lang]), lang, **kw), _fill(rng.choice(CAPITAL_A[lang]), lang, **kw), {}


def _gen_story(world, lang, rng, ctx):
    p = rng.choice(world.people)
    parts = _story_parts(world, p, rng.randrange(len(STORIES[lang])), lang, rng)
    sep = " " if lang == "en" else ""
    i = rng.randrange(len(STORY_Q[lang]))
    q = _fill(STORY_Q[lang][i], lang, name=NAMES[p.index][0 if lang == "en" else 1], setup=parts["setup"],
              **_pronouns(p, lang))
    answer = parts["setup"] + sep + parts["right_story"] if i < 2 else parts["right_alone"]
    return q, answer, {"person": p}


_FIRST = [(_gen_fact, 3), (_gen_math, 2), (_gen_story, 2), (_gen_count, 1), (_gen_animals, 1), (_gen_capital, 0.5)]
_FOLLOW = {"person": _gen_fact_follow, "value": _gen_math_follow}


def _draw(world, lang, rng, used: set[str], ctx: dict, tries: int = 40) -> tuple[str, str, dict]:
    """One exchange whose texts were never used: a follow-up of `ctx` when possible (70 %), else a fresh one."""
    gens = [g for k, g in _FOLLOW.items() if k in ctx]
    if not (gens and rng.random() < 0.7):
        gens = []
    fresh, weights = zip(*_FIRST)
    for attempt in range(tries):
        gen = gens[0] if gens and attempt < tries // 2 else rng.choices(fresh, weights)[0]
        q, a, new_ctx = gen(world, lang, rng, ctx)
        if q not in used and a not in used and q != a and _fits(q, lang) and _fits(a, lang):
            used.update((q, a))
            return q, a, new_ctx
    raise RuntimeError(f"toy world exhausted: no unused {lang} sentence after {tries} tries; ask for fewer dialogues")


_UNITS = {"en": (5, 18), "zh": (7, 26)}
"""Words (en) / characters (zh) per utterance: about 1-8 s of espeak-ng speech at the speakers' rates."""


def _fits(text: str, lang: str) -> bool:
    lo, hi = _UNITS[lang]
    return lo <= len(split_words(text, lang)) <= hi


def plan_texts(seed: int, num_dialogues: int) -> list[tuple[str, list[str]]]:
    """(language, turn texts) per dialogue: languages alternate, 1-3 exchanges, every text unique."""
    world, rng, used = ToyWorld(seed), random.Random(f"dialogues-{seed}"), set()
    plans = []
    for i in range(num_dialogues):
        lang, ctx, texts = ("en", "zh")[i % 2], {}, []
        for _ in range(rng.choices((1, 2, 3), (0.4, 0.35, 0.25))[0]):
            q, a, ctx = _draw(world, lang, rng, used, ctx)
            texts += [q, a]
        plans.append((lang, texts))
    return plans


def toy_world_texts(seed: int, n: int) -> list[str]:
    """`n` distinct sentences (questions, answers, stories; English and Chinese alternate) from the toy world."""
    texts = []
    for _, turns in plan_texts(seed, (n + 1) // 2 + 1):
        texts += turns
        if len(texts) >= n:
            break
    return texts[:n]


_CJK = "\u3400-\u9fff"


def split_words(text: str, language: str) -> list[tuple[int, int, str]]:
    """The units the ``words`` field times: (char start, char end, token); English words, Chinese characters."""
    pattern = rf"[{_CJK}]|[A-Za-z0-9]+(?:'[A-Za-z]+)?" if language == "zh" else r"[A-Za-z0-9]+(?:'[A-Za-z]+)?"
    return [(m.start(), m.end(), m.group()) for m in re.finditer(pattern, text)]


def write_text_corpus(path: str | Path, *, seed: int = 1234, num_dialogues: int = 1200, num_documents: int = 2000,
                      dialogues_per_document: int = 4) -> Path:
    """A JSONL text corpus ({"id", "language", "text"}) of the same toy world as the speech corpus: input for
    ``interleave`` and the text share of stage 3. Each document joins ``dialogues_per_document`` randomly chosen
    dialogues of one language (the world's sentences recur across documents in new combinations)."""
    path = Path(path)
    by_lang: dict[str, list[list[str]]] = {"en": [], "zh": []}
    for lang, turns in plan_texts(seed, num_dialogues):
        by_lang[lang].append(turns)
    rng = random.Random(f"text-{seed}")
    lines = []
    for i in range(num_documents):
        lang = ("en", "zh")[i % 2]
        sentences = [t for turns in rng.sample(by_lang[lang], dialogues_per_document) for t in turns]
        text = (" " if lang == "en" else "").join(sentences)
        lines.append(json.dumps({"id": f"text{i:06d}", "language": lang, "text": text}, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ spoken QA evaluation
_QA_PROMPT_KINDS = (("fact", 0.6), ("capital", 0.2), ("math", 0.2))


def _pet_answers(k: int, lang: str) -> list[str]:
    """A pet as accepted in an answer: the bare noun (both numbers in English); in Chinese the noun, or with its
    measure word when the noun is one character (马 alone would match the name 马兰)."""
    s, pl, zh, m = PETS[k]
    if lang == "en":
        return list(dict.fromkeys((s, pl)))
    return [f"一{m}{zh}", zh if len(zh) > 1 else m + zh]


def _fact_answers(attr: str, k: int, lang: str) -> list[str]:
    """Accepted answers for value index `k` of `attr`; the first is the canonical form (the candidates' form)."""
    en = lang == "en"
    if attr == "pet":
        return _pet_answers(k, lang)
    if attr == "age":
        return [number_words(k, lang)]
    table = {"colour": COLOURS, "food": FOODS, "city": CAPITALS, "job": JOBS, "hobby": HOBBIES}[attr]
    return [table[k][0 if en else 1]]


def _fact_candidates(attr: str, lang: str) -> list[str]:
    if attr == "age":
        return [number_words(a, lang) for a in range(6, 16)]
    size = {"colour": COLOURS, "pet": PETS, "food": FOODS, "city": CAPITALS, "job": JOBS, "hobby": HOBBIES}[attr]
    return [_fact_answers(attr, k, lang)[0] for k in range(len(size))]


def _math_operands(op: str, rng: random.Random) -> tuple[int, int]:
    """Operands drawn as the corpus draws them (``_gen_math``)."""
    if op == "+":
        return rng.randint(0, 12), rng.randint(0, 12)
    if op == "-":
        a = rng.randint(1, 20)
        return a, rng.randint(0, a)
    return rng.randint(2, 9), rng.randint(2, 9)


_MATH_RESULTS = {"+": sorted({a + b for a in range(13) for b in range(13)}),
                 "-": sorted({a - b for a in range(1, 21) for b in range(a + 1)}),
                 "*": sorted({a * b for a in range(2, 10) for b in range(2, 10)})}


def qa_items(seed: int, n: int, language: str) -> list[dict]:
    """`n` distinct spoken-QA items about the toy world of `seed`, asked with the corpus's own templates: a person's
    favourite colour/pet/food/city/job/hobby/age (``FACT_Q``), a country's capital or a capital's country
    (``CAPITAL_Q``), small arithmetic (``MATH_Q``).

    Each item: ``{"question", "answers"`` (accepted strings, canonical form first), ``"candidates"`` (canonical forms of
    every value the question could have, for the chance level), ``"reference"`` (the answer sentence as the corpus
    speaks it), ``"topic"``, ``"language"}``. No fact is asked twice; deterministic for (seed, n, language).
    """
    if language not in ("en", "zh"):
        raise ValueError(f"qa_items: language must be 'en' or 'zh', got {language!r}")
    world, rng = ToyWorld(seed), random.Random(f"qa-{seed}-{language}")
    en, items, asked = language == "en", [], set()
    kinds, weights = zip(*_QA_PROMPT_KINDS)
    for _ in range(50 * n + 100):
        if len(items) == n:
            break
        kind = rng.choices(kinds, weights)[0]
        if kind == "fact":
            p, attr = rng.choice(world.people), rng.choice(ATTRIBUTES)
            key = (kind, p.index, attr)
            name = NAMES[p.index][0 if en else 1]
            k = p.age if attr == "age" else getattr(p, attr)
            item = {"question": _fill(rng.choice(FACT_Q[language][attr]), language, name=name),
                    "answers": _fact_answers(attr, k, language), "candidates": _fact_candidates(attr, language),
                    "reference": _fill(rng.choice(FACT_A[language][attr]), language, name=name,
                                       v=world.value(p, attr, language)), "topic": attr}
        elif kind == "capital":
            c, i = rng.randrange(len(COUNTRIES)), rng.randrange(len(CAPITAL_Q[language]))
            asks_country = i >= 3  # the last two templates name the capital and ask for the country
            key = (kind, c, asks_country)
            kw = {"country": COUNTRIES[c][not en], "capital": CAPITALS[world.capital_of[c]][not en]}
            pool = COUNTRIES if asks_country else CAPITALS
            item = {"question": _fill(CAPITAL_Q[language][i], language, **kw),
                    "answers": [kw["country" if asks_country else "capital"]],
                    "candidates": [v[not en] for v in pool],
                    "reference": _fill(rng.choice(CAPITAL_A[language]), language, **kw),
                    "topic": "country" if asks_country else "capital"}
        else:
            op = rng.choice("+-*")
            a, b = _math_operands(op, rng)
            key = (kind, op, a, b)
            reference, words, c = _math_answer(language, rng, op, a, b)
            item = {"question": _fill(rng.choice(MATH_Q[language][op]), language, **words),
                    "answers": [words["c"]], "candidates": [number_words(v, language) for v in _MATH_RESULTS[op]],
                    "reference": reference, "topic": {"+": "plus", "-": "minus", "*": "times"}[op]}
        if key in asked:
            continue
        asked.add(key)
        items.append({**item, "language": language})
    if len(items) < n:
        raise ValueError(f"qa_items: the toy world gave only {len(items)} distinct {language} questions, asked for {n}")
    return items
