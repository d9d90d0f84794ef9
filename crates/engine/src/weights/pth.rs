//! PyTorch `.pth` checkpoints (zip + pickle), as the official Wan release ships the VAE and T5.
//! (Being implemented: see the weights-format work item.)
