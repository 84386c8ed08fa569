"""Recipes: YAML files that name registered methods, their arguments and stages. See :mod:`.schema`."""

from sparse_lightning.recipes.loader import LoadedRecipe, RecipeError, find_recipe, load, load_recipe, shipped_recipes

__all__ = ["LoadedRecipe", "RecipeError", "find_recipe", "load", "load_recipe", "shipped_recipes"]
