"""Independent Linf attacks on the models of results/: foolbox's FMN-Linf (200 steps) and
Linf PGD (100 steps, its default relative step and random start) on the same images as
the headline table, beside the standard evaluation's robust accuracy from that table.

    .venv/bin/python results/compare_linf.py RUN... --limit 200 --out results/smallcnn-fgsm

Writes independent_linf.csv: model, eps, standard (from results.json), fmn_linf_200,
pgd_linf_100 (foolbox), and standard minus the lower of the two.  tests/test_results.py
checks that no standard cell is more than 0.5 points above either.  The work is
compare_l2.py's, for the other norm.
"""
from compare_l2 import main

if __name__ == "__main__":
    main("Linf")
