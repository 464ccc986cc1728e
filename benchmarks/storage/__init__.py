"""How many bytes an impression takes in each feedback store, and that retention bounds them."""
