"""Reading the Kaggle layout, preprocessing captions, labels and images, datasets."""

