"""MCTS on the engine vs its baseline, in the suite runner (see bench/ttc.py)."""
from bench.ttc import interface

globals().update(interface("mcts"))
