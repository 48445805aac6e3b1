r"""The Math-Verify worker program, run as a fresh interpreter by `groupwise.rewards.verify_pool`.

Started as `python -P <this file>` (-P: its directory, which holds a `math.py`, is not put on
sys.path), it imports only the standard library, math-verify and sympy: never this package or torch.

It reads one JSON job per line on stdin and writes one JSON reply per line:
  job:   {"gold": str, "gold_kind": "answer"|"text", "pred": str, "pred_kind": ..., "timeout": s}
  reply: {"status": "ok", "value": 0|1} | {"status": "gold"} (gold unparseable)
         | {"status": "timeout", "value": phase} | {"status": "error", "value": message}
A "text" is given to math_verify.parse as is (its own extraction); an "answer" (a bare final
answer such as "2\sqrt{3}" or "50\%") is parsed inside $...$ unless it has delimiters of its own:
parsed as is, "2\sqrt{3}" would read as 2 and "x=3" as 3.
"""

import json
import os
import re
import resource
import signal
import sys


class Overrun(BaseException):
    """The job's timer fired; a BaseException, so Math-Verify's `except Exception` cannot swallow it."""


armed = [False]


def on_alarm(signum, frame):
    if armed[0]:  # a late alarm, after the job ended, is ignored
        armed[0] = False
        raise Overrun()


THIN_SPACE_THOUSANDS = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")  # 1\,234 (Math-Verify reads it as 235)
DELIMITED = re.compile(r"\$|\\boxed|\\fbox|\\\(|\\\[|\n")


def normalize(text):
    return THIN_SPACE_THOUSANDS.sub("", text.replace("\u2212", "-"))  # U+2212 minus sign


def limit_cpu(seconds):
    # Kernel backstop: if this job burns `seconds` more CPU (say, the parent died while it was stuck), SIGXCPU ends us.
    try:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
        target = int(usage.ru_utime + usage.ru_stime + seconds) + 1
        if hard != resource.RLIM_INFINITY:
            target = min(target, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (target, hard))
    except (ValueError, OSError):
        pass


def main():
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol

    def send(message):
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    try:
        import logging
        logging.disable(logging.CRITICAL)  # Math-Verify logs every disabled timeout and failed parse
        import math_verify as mv
        from sympy import Mul, Rational, UnevaluatedExpr
        percent = UnevaluatedExpr(Rational(1, 100))  # latex2sympy reads "X%" as X*UnevaluatedExpr(1/100)
        mv.verify(mv.parse("$1$", parsing_timeout=None), mv.parse("1", parsing_timeout=None), timeout_seconds=None)
    except BaseException as e:
        send({"error": "%s: %s" % (type(e).__name__, e)})
        return

    cache = {}

    def parse(text, kind):
        key = (text, kind)
        if key in cache:
            return cache[key]
        text = normalize(text)
        if kind == "answer" and not DELIMITED.search(text):
            result = mv.parse("$" + text + "$", parsing_timeout=None) or mv.parse(text, parsing_timeout=None)
        else:
            result = mv.parse(text, parsing_timeout=None)
        if len(key[0]) <= 2000:  # golds and short answers repeat; long completions rarely do
            if len(cache) >= 4096:
                cache.clear()
            cache[key] = result
        return result

    def without_percent(items):
        out, changed = [], False
        for x in items:
            if isinstance(x, Mul) and len(x.args) == 2 and percent in x.args:
                x, changed = x.args[0] if x.args[1] == percent else x.args[1], True
            out.append(x)
        return out, changed

    def equal(gold, pred):
        if mv.verify(gold, pred, timeout_seconds=None):
            return True
        # Math-Verify already equates 50% with 0.5 and with 50, but 12.5% only with 0.125: a percentage
        # also equals its number without the sign, whatever that number is.
        gold2, changed_gold = without_percent(gold)
        pred2, changed_pred = without_percent(pred)
        return (changed_gold or changed_pred) and mv.verify(gold2, pred2, timeout_seconds=None)

    def run(job, phase):
        try:
            gold = parse(job["gold"], job["gold_kind"])
            if not gold:
                return {"status": "gold"}
            phase[0] = "prediction"
            pred = parse(job["pred"], job["pred_kind"])
            phase[0] = "verify"
            return {"status": "ok", "value": int(bool(pred) and bool(equal(gold, pred)))}
        except Overrun:
            return {"status": "timeout", "value": phase[0]}
        except Exception as e:
            return {"status": "error", "value": ("%s: %s" % (type(e).__name__, e))[:300]}

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which kills us
    send({"ready": os.getpid()})
    for line in sys.stdin:
        job = json.loads(line)
        phase = ["gold"]
        reply = {"status": "timeout", "value": "late"}  # kept if the alarm lands between run() and disarming
        try:
            try:
                limit_cpu(job["timeout"] + 5)
                armed[0] = True
                signal.setitimer(signal.ITIMER_REAL, job["timeout"])
                reply = run(job, phase)
            finally:
                armed[0] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
        except Overrun:
            pass
        send(reply)



if __name__ == "__main__":
    main()
