"""Pictures of what a checkpoint learned (`glsd visualize ...`), drawn with Pillow and numpy only.

- :mod:`.attention`: the last block's CLS attention of each head, recomputed from its input;
- :mod:`.matches`: two sampled views with lines between geometrically or similarity-matched tokens;
- :mod:`.embedding`: a 2-D projection (PCA, or t-SNE with scikit-learn) of features by label;
- :mod:`.drawing` and :mod:`.images`: colour maps, fonts, PNG writing and image loading.

matplotlib is deliberately not used: it is an optional dependency, and these pictures need no more
than lines, dots, text and a colour map.
"""
