"""Student networks: the timm factory with self-supervised checkpoint loading and the EMAN teacher
(`student`), the demo CNN (`cnn`) and Wide ResNets for 32 px SSL (`wrn`).

Importing this package registers the package's own architectures with timm (``zsa_cnn_small``, ``wrn28_2``,
``wrn28_8``), so ``import zeroshot_adapt.models`` is all an exported folder of one of them needs before
``timm.create_model("local-dir:DIR", pretrained=True)``."""

from zeroshot_adapt.models import cnn, wrn  # noqa: F401  (registers zsa_cnn_small, wrn28_2, wrn28_8 with timm)
