"""The data layer: WebDataset shards of original image bytes, and DDP-exact loaders that read them.

- :mod:`gnr.data.shards` writes shards (an ImageNet folder tree, or the bundled digits demo).
- :mod:`gnr.data.manifest` is the ``<split>.json`` beside them and the URLs of a source.
- :mod:`gnr.data.loader` turns a split into training and evaluation batches.
- :mod:`gnr.data.transforms` holds the image transforms (timm's recipe, output in [0, 1] pixels).
"""
