"""vaelab: Variational Autoencoders on MNIST, from the ELBO up."""

__version__ = "0.1.0"
