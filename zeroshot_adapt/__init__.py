"""zeroshot-adapt: adapt CLIP to unlabeled image data with DebiasPL (CVPR 2022), and bring CLIP into SSL.

Exported models (``zsa export``): ``zeroshot_adapt.load_exported(DIR) -> (model, info)``,
``zeroshot_adapt.predict_folder(DIR, images_dir, top_k=5)``, ``zeroshot_adapt.predict_images(DIR, images)``
(imported on first use, so ``import zeroshot_adapt`` stays light)."""

__version__ = "0.1.0"

_LAZY = {
    "export_run": "zeroshot_adapt.export",
    "load_exported": "zeroshot_adapt.export",
    "ExportInfo": "zeroshot_adapt.export",
    "predict_folder": "zeroshot_adapt.predict",
    "predict_images": "zeroshot_adapt.predict",
    "Predictor": "zeroshot_adapt.predict",
    "PredictionResult": "zeroshot_adapt.predict",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zeroshot_adapt' has no attribute {name!r}")
