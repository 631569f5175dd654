"""Student networks: the timm factory with self-supervised checkpoint loading and the EMAN teacher
(`student`), the demo CNN (`cnn`) and Wide ResNets for 32 px SSL (`wrn`)."""
