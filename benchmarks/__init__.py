"""adaptsoup's benchmarks (installed as ``adaptsoup_bench``; ``pip install adaptsoup[bench]``): CIFAR-10-C,
ImageNet-C / LAION-C trees, families of ingredients, label-free transfer, the digits demo, and the data
they generate. The product package ``adaptsoup`` never imports this one.
"""
