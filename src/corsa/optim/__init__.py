"""Pure pieces of the CoRSA update: the two losses, PCGrad and the SAM perturbation."""
