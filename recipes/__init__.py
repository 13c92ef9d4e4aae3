"""Model recipes: declarative recipe files (*.yaml) users edit, and the model transforms they name."""
