from autoglm_train.plan.report import main

main()
