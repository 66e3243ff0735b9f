"""Quality of a student against its teacher: task accuracy by greedy generation, KL and CE on held-out text.

- :mod:`.generate`: greedy decoding from any next-token function and exact-match accuracy.
- :mod:`.agreement`: per-token KL(teacher || student), cross entropy and top-1 agreement from logits.
- :mod:`.students`: a saved teacher or student (a megatron.core model at TP = PP = 1) evaluated on
  an arithmetic task and on general text.
"""
