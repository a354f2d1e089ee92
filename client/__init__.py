"""The site side: the ClientApp and the local trainer."""
