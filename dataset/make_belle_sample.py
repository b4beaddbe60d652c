"""Writes dataset/belle_sample.json: a small BELLE-format chat set written for this project.

Every conversation is built from question/answer pairs generated from facts listed below (capitals, arithmetic,
unit conversion, definitions, greetings and self-introduction as a Baichuan assistant), in English and Chinese.
Each question maps to exactly one answer, and answers start with the fact itself, so a tiny model trained on the
file can be checked by the first characters of its reply. The output is deterministic (fixed seed, sorted inputs):
rerunning gives the same bytes.

    python dataset/make_belle_sample.py [--out dataset/belle_sample.json] [--num 420]
"""
import argparse
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

# (country en, capital en, country zh, capital zh)
CAPITALS = [
    ("France", "Paris", "法国", "巴黎"), ("Japan", "Tokyo", "日本", "东京"), ("Italy", "Rome", "意大利", "罗马"),
    ("Germany", "Berlin", "德国", "柏林"), ("Spain", "Madrid", "西班牙", "马德里"),
    ("Egypt", "Cairo", "埃及", "开罗"), ("Canada", "Ottawa", "加拿大", "渥太华"),
    ("Australia", "Canberra", "澳大利亚", "堪培拉"), ("Brazil", "Brasilia", "巴西", "巴西利亚"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"), ("India", "New Delhi", "印度", "新德里"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕"), ("Norway", "Oslo", "挪威", "奥斯陆"),
    ("Greece", "Athens", "希腊", "雅典"), ("Peru", "Lima", "秘鲁", "利马"), ("Cuba", "Havana", "古巴", "哈瓦那"),
    ("Thailand", "Bangkok", "泰国", "曼谷"), ("Vietnam", "Hanoi", "越南", "河内"),
    ("Portugal", "Lisbon", "葡萄牙", "里斯本"), ("Ireland", "Dublin", "爱尔兰", "都柏林"),
    ("Austria", "Vienna", "奥地利", "维也纳"), ("Poland", "Warsaw", "波兰", "华沙"),
    ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"), ("Chile", "Santiago", "智利", "圣地亚哥"),
]

# (term en, definition en, term zh, definition zh)
DEFINITIONS = [
    ("photosynthesis", "the process plants use to turn light, water and carbon dioxide into sugar and oxygen",
     "光合作用", "植物利用光、水和二氧化碳制造糖和氧气的过程"),
    ("gravity", "the force that pulls objects with mass toward each other", "引力", "使有质量的物体相互吸引的力"),
    ("a prime number", "a whole number greater than 1 whose only divisors are 1 and itself",
     "质数", "大于1且只能被1和它本身整除的整数"),
    ("an algorithm", "a finite list of steps that solves a problem", "算法", "解决问题的一组有限步骤"),
    ("a neural network", "a model made of layers of weighted sums and non-linear functions",
     "神经网络", "由多层加权求和与非线性函数组成的模型"),
    ("a tokenizer", "a tool that splits text into tokens and maps them to ids",
     "分词器", "把文本切分成词元并映射为编号的工具"),
    ("evaporation", "the change of a liquid into a gas at its surface", "蒸发", "液体在表面变成气体的过程"),
    ("an ecosystem", "living things and their environment working together as one system",
     "生态系统", "生物与其环境共同构成的整体"),
    ("inflation", "a general rise in prices over time", "通货膨胀", "物价在一段时间内普遍上涨的现象"),
    ("a volcano", "an opening in the earth's crust where molten rock comes out",
     "火山", "地壳上喷出熔岩的开口"),
    ("democracy", "a system of government in which citizens choose their leaders by voting",
     "民主", "公民通过投票选择领导人的政治制度"),
    ("a compiler", "a program that translates source code into machine code",
     "编译器", "把源代码翻译成机器码的程序"),
    ("an atom", "the smallest unit of a chemical element", "原子", "化学元素的最小单位"),
    ("a vaccine", "a preparation that trains the immune system to fight a disease",
     "疫苗", "训练免疫系统抵抗疾病的制剂"),
    ("climate", "the average weather of a region over many years", "气候", "一个地区多年平均的天气状况"),
    ("a database", "an organised collection of data that software can query", "数据库", "可供软件查询的有组织的数据集合"),
]

# (amount, unit en, unit zh, factor, target en, target zh)
UNITS = [
    (3, "kilometers", "千米", 1000, "meters", "米"), (5, "kilograms", "千克", 1000, "grams", "克"),
    (2, "hours", "小时", 60, "minutes", "分钟"), (4, "meters", "米", 100, "centimeters", "厘米"),
    (7, "liters", "升", 1000, "milliliters", "毫升"), (6, "minutes", "分钟", 60, "seconds", "秒"),
    (9, "days", "天", 24, "hours", "小时"), (8, "kilometers", "千米", 1000, "meters", "米"),
    (12, "meters", "米", 100, "centimeters", "厘米"), (3, "weeks", "周", 7, "days", "天"),
    (15, "kilograms", "千克", 1000, "grams", "克"), (5, "hours", "小时", 60, "minutes", "分钟"),
]

SMALL_TALK = [
    ("Hello!", "Hello! I am Baichuan, an AI assistant. How can I help you today?"),
    ("Who are you?", "I am Baichuan, a large language model assistant. I answer questions and help with writing."),
    ("What can you do?", "Many things: answer questions, explain concepts, do arithmetic and convert units."),
    ("Good morning.", "Good morning! I hope you have a productive day."),
    ("Thank you!", "You are welcome. Feel free to ask me anything else."),
    ("Goodbye.", "Goodbye! Have a nice day."),
    ("Can you speak Chinese?", "Yes, I can chat in both Chinese and English."),
    ("What is your name?", "My name is Baichuan. I am an AI assistant."),
    ("你好", "你好！我是百川，一个人工智能助手，很高兴为你服务。"),
    ("你是谁？", "我是百川大模型，一个可以回答问题和帮助写作的人工智能助手。"),
    ("你能做什么？", "我可以回答问题、解释概念、做算术和换算单位。"),
    ("早上好", "早上好！祝你今天一切顺利。"),
    ("谢谢你！", "不客气，有问题随时问我。"),
    ("再见", "再见！祝你生活愉快。"),
    ("你会说英语吗？", "会的，我可以用中文和英文交流。"),
    ("你叫什么名字？", "我叫百川，是一个人工智能助手。"),
]

ZH_DIGITS_OP = {"+": "加", "-": "减", "*": "乘以"}


def qa_pairs():
    """All (question, answer) pairs; every question is unique and has exactly one answer."""
    pairs = []
    for country, capital, country_zh, capital_zh in CAPITALS:
        pairs.append((f"What is the capital of {country}?", f"{capital} is the capital of {country}."))
        pairs.append((f"{country_zh}的首都是哪里？", f"{capital_zh}是{country_zh}的首都。"))
    for term, definition, term_zh, definition_zh in DEFINITIONS:
        pairs.append((f"What is {term}?", f"{term[0].upper() + term[1:]} is {definition}."))
        pairs.append((f"什么是{term_zh}？", f"{term_zh}是{definition_zh}。"))
    for amount, unit, unit_zh, factor, target, target_zh in UNITS:
        pairs.append((f"How many {target} are in {amount} {unit}?",
                      f"{amount * factor} {target}: {amount} {unit} x {factor} = {amount * factor}."))
        pairs.append((f"{amount}{unit_zh}等于多少{target_zh}？",
                      f"{amount * factor}{target_zh}，因为{amount}乘以{factor}等于{amount * factor}。"))
    rng = random.Random(1234)
    seen = set()
    while len(seen) < 60:
        a, b, op = rng.randint(2, 60), rng.randint(2, 40), rng.choice("+-*")
        if (a, b, op) in seen:
            continue
        seen.add((a, b, op))
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        if len(seen) % 2:
            pairs.append((f"What is {a} {op} {b}?", f"{result}. {a} {op} {b} = {result}."))
        else:
            pairs.append((f"{a}{ZH_DIGITS_OP[op]}{b}等于多少？", f"{result}。{a}{ZH_DIGITS_OP[op]}{b}等于{result}。"))
    pairs.extend(SMALL_TALK)
    questions = [q for q, _ in pairs]
    assert len(questions) == len(set(questions)), "duplicate question in the generated facts"
    return pairs


def make_conversations(num, seed=0):
    """Every pair once as a single turn, then random 2-3 turn mixes of the same pairs (same language)."""
    pairs = qa_pairs()
    rng = random.Random(seed)
    convs = [[p] for p in pairs]
    by_lang = {"zh": [p for p in pairs if not p[0].isascii()], "en": [p for p in pairs if p[0].isascii()]}
    while len(convs) < num:
        pool = by_lang[rng.choice(["en", "zh"])]
        convs.append(rng.sample(pool, rng.choice([2, 2, 3])))
    records = []
    for i, turns in enumerate(convs):
        conversation = []
        for q, a in turns:
            conversation += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        records.append({"id": f"belle_sample_{i:04d}", "conversations": conversation})
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "belle_sample.json"))
    parser.add_argument("--num", type=int, default=420, help="number of conversations (>= number of QA pairs)")
    args = parser.parse_args(argv)
    records = make_conversations(args.num)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(records)} conversations to {args.out} ({os.path.getsize(args.out) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
