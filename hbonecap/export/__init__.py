"""Writing what hbonecap recovered back out as captures other tools read."""
